"""Rectified flow: the training target, the timestep sampling and the samplers (Euler,
Euler a, Heun, DPM++ 2M, UniPC).

Rectified flow (Liu, Gong & Liu 2022, "Flow Straight and Fast"; also Lipman et al. 2022, flow
matching) joins data x0 and Gaussian noise ε by a straight line

    x_t = (1 − t)·x0 + t·ε,      t ∈ [0, 1]   (t = 1 is pure noise)

and trains a network v(x_t, t, c) to predict the constant velocity dx_t/dt = ε − x0. Sampling
integrates dx/dt = v from t = 1 to t = 0 with Euler steps, x_{t'} = x_t + (t' − t)·v, or with
Heun's second-order method (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 1): an Euler step, then the average of the slopes at both ends.
"Euler a" is the stochastic flow Euler step of diffusers' ``FlowMatchEulerDiscreteScheduler``
(``stochastic_sampling=True``): predict x0 = x_t − t·v, then re-noise it to the next time with
fresh noise, x_{t'} = (1 − t')·x0 + t'·ε' — the flow counterpart of A1111's ancestral Euler.
Two multistep solvers reuse earlier predictions instead of extra model calls, one call per step:
DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models") and UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
Framework for Fast Sampling of Diffusion Models"). These run diffusers' own schedulers with flow
sigmas: toile's velocity ε − x0 is diffusers' ``flow_prediction`` (x0 = x_t − t·v), and a flow
scheduler's sigma is toile's t.

Training draws t from a logit-normal distribution (Esser et al. 2024, "Scaling Rectified Flow
Transformers", SD3), which puts more samples at mid-range t where the velocity is hardest to
predict. Classifier-free guidance (Ho & Salimans 2022) mixes a conditional and an unconditional
prediction, v = v_u + g·(v_c − v_u).

Every function here works on packed tensors [B, C, h, w] and one model contract,
``velocity(x [B,C,h,w], t [B], cond) -> v [B,C,h,w]``, so the sampler knows nothing about
U-Nets, text encoders or pixels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

# v = velocity(x_t, t, cond): the one model contract (see denoiser.predict_velocity).
Velocity = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
# step_callback(step, total, x) after each step; raising stops sampling (cancellation).
StepCallback = Callable[[int, int, torch.Tensor], None]
# cond_at(step) -> (cond, uncond) for step 1, 2, ... of those that run: the text conditioning
# when it changes during sampling (A1111 prompt editing and alternation).
StepConditions = Callable[[int], tuple[Any, Any]]
# The integration methods ``sample`` implements, by toile.samplers' names.
SAMPLERS = {"Euler": "euler", "Euler a": "euler_a", "Heun": "heun", "DPM++ 2M": "dpmpp_2m",
            "UniPC": "unipc"}
# step_noise(step) -> fresh Gaussian noise shaped like x, for step 1, 2, ...: a stochastic
# sampler's per-step noise, drawn from the run's own generators so a seed reproduces.
StepNoise = Callable[[int], torch.Tensor]
# The methods that step a diffusers multistep scheduler: method -> toile.samplers' name, whose
# FLOW_SAMPLERS entry says the class and flow options (the ones SD3 and FLUX.1 run).
SOLVERS = {"dpmpp_2m": "DPM++ 2M", "unipc": "UniPC"}
# x_next = advance(i, x, v, evaluate): step i from times[i] to times[i + 1], given the guided
# velocity v at (x, times[i]); ``evaluate(x, t)`` is that step's guided velocity elsewhere (Heun).
Evaluate = Callable[[torch.Tensor, float], torch.Tensor]
Advance = Callable[[int, torch.Tensor, torch.Tensor, Evaluate], torch.Tensor]


def forward_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·noise, with ``t`` [B] (or a scalar) broadcast over [B, C, h, w]."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1))) if t.dim() else t
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow regression target dx_t/dt = noise − x0."""
    return noise - x0


def sample_logit_normal(
    batch: int, *, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """t = sigmoid(u), u ~ N(mean, std²): SD3's logit-normal t density (Esser et al. 2024)."""
    u = torch.randn(batch, generator=generator) * std + mean
    return torch.sigmoid(u)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift t' = s·t / (1 + (s − 1)·t); s > 1 spends more steps near noise."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_schedule(steps: int, *, shift: float = 1.0, start: float = 1.0) -> torch.Tensor:
    """The ``steps + 1`` times t_0 = start > ... > t_steps = 0 that Euler steps between.

    Uniform in t (then shifted) from 1 to 0. For img2img (``start`` < 1) the same schedule is
    cut at ``start`` and ``start`` prepended, so a strength-s run does about s·steps steps and
    starts exactly at t = s, as diffusers' img2img pipelines do with their ``strength``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start must be in (0, 1], got {start}")
    full = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    if start >= 1.0:
        return full
    below = full[full < start]
    return torch.cat([torch.tensor([start], dtype=torch.float64), below])


def guided_velocity(
    velocity: Velocity, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, guidance: float,
    cat: Callable[[list[Any]], Any] | None = None,
) -> torch.Tensor:
    """Classifier-free guidance: v_u + g·(v_c − v_u), both halves in one batched call.

    ``guidance`` 1.0 (or no ``uncond``) runs the conditional model only. ``cat`` joins
    ``[cond, uncond]`` into one condition batch.
    """
    if uncond is None or guidance == 1.0:
        return velocity(x, t, cond)
    joined = cat([cond, uncond]) if cat is not None else [cond, uncond]
    v = velocity(torch.cat([x, x]), torch.cat([t, t]), joined)
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def sample(
    velocity: Velocity,
    noise: torch.Tensor,
    cond: Any,
    *,
    times: torch.Tensor,
    uncond: Any = None,
    guidance: float = 1.0,
    cat: Callable[[list[Any]], Any] | None = None,
    x0_known: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    method: str = "euler",
    cond_at: StepConditions | None = None,
    step_noise: StepNoise | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from ``times[0]`` to ``times[-1]`` = 0 with ``method``'s steps:
    ``"euler"``; ``"euler_a"``, Euler's x0 prediction re-noised with ``step_noise(i)`` at each
    step (needs ``step_noise``); ``"heun"``, two model calls per step but the last, as in
    Karras et al.'s Algorithm 1, whose final step to t = 0 is Euler's; ``"dpmpp_2m"``
    (DPM-Solver++(2M), Lu et al. 2022) or ``"unipc"`` (UniPC, Zhao et al. 2023), one call per
    step, run by a diffusers multistep scheduler whose sigmas are ``times`` (see
    ``flow_solver``).

    - txt2img: ``times[0]`` = 1, x starts as ``noise``.
    - img2img: ``x0_known`` is the encoded input image; x starts at
      ``forward_noise(x0_known, noise, times[0])`` (times[0] = strength).
    - inpaint: additionally ``keep_mask`` [B, C, h, w] (1 = known pixel, 0 = repaint). After
      every step the known region is replaced by the forward-noised original at the new t — the
      latent blending of diffusers' inpaint pipelines and of RePaint (Lugmayr et al. 2022)
      without its resampling — so at t = 0 it equals ``x0_known`` exactly.
    - ``cond_at(step)``, when given, is each step's (cond, uncond) in place of ``cond`` /
      ``uncond``, steps counted from 1 over the steps that run (img2img starts the count at its
      first step, as A1111 does); Heun's two evaluations of a step share its conditioning.
    - Guidance mixes the two predictions before any step, so every method integrates (and the
      multistep solvers remember) the guided velocity.

    Returns x at t = 0, [B, C, h, w], in float32. Noise and the integration run in float32
    whatever the model's dtype, so low-precision models only round their own predictions.
    """
    if method not in SAMPLERS.values():
        raise ValueError(f"method must be one of {', '.join(SAMPLERS.values())}, got {method!r}")
    if method == "euler_a" and step_noise is None:
        raise ValueError("euler_a needs step_noise (its fresh noise per step)")
    times = times.to(torch.float64)
    x = noise.float()
    if x0_known is not None:
        x0_known = x0_known.float()
        x = forward_noise(x0_known, x, torch.tensor(float(times[0])))
    if keep_mask is not None:
        if x0_known is None:
            raise ValueError("keep_mask needs x0_known (the image being inpainted)")
        keep_mask = keep_mask.float()
    # One stepper per run: a multistep solver's history belongs to this run only.
    advance = _stepper(method, times, x.device, step_noise)
    total = len(times) - 1
    for i in range(total):
        if cond_at is not None:
            cond, uncond = cond_at(i + 1)
        evaluate = _evaluator(velocity, cond, uncond, guidance, cat, x.shape[0])
        x = advance(i, x, evaluate(x, float(times[i])), evaluate)
        if keep_mask is not None:
            known = forward_noise(x0_known, noise.float(), torch.tensor(float(times[i + 1])))
            x = keep_mask * known + (1.0 - keep_mask) * x
        if callback is not None:
            callback(i + 1, total, x)
    return x


def _evaluator(
    velocity: Velocity, cond: Any, uncond: Any, guidance: float,
    cat: Callable[[list[Any]], Any] | None, batch: int,
) -> Evaluate:
    """``evaluate(x, t)``: the guided velocity at one time for the whole batch, in float32."""

    def evaluate(x: torch.Tensor, t: float) -> torch.Tensor:
        t_vec = torch.full((batch,), t, dtype=torch.float32, device=x.device)
        return guided_velocity(velocity, x, t_vec, cond, uncond, guidance, cat).float()

    return evaluate


def _stepper(method: str, times: torch.Tensor, device: torch.device,
             step_noise: StepNoise | None = None) -> Advance:
    """The step function of ``method`` over ``times`` (float64)."""
    if method in SOLVERS:
        return _solver_steps(flow_solver(SOLVERS[method], times, device))

    def advance(i: int, x: torch.Tensor, v: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        t_now, t_next = float(times[i]), float(times[i + 1])
        if method == "euler_a":  # diffusers' stochastic flow Euler step
            assert step_noise is not None
            x0 = x - t_now * v
            return x0 if t_next == 0 else (1.0 - t_next) * x0 + t_next * step_noise(i + 1).float()
        x_euler = x + (t_next - t_now) * v
        # Heun's correction on every step but the last, to t = 0 (Karras et al., Algorithm 1).
        if method == "heun" and t_next > 0:
            return x + (t_next - t_now) * 0.5 * (v + evaluate(x_euler, t_next))
        return x_euler

    return advance


def _solver_steps(scheduler: Any) -> Advance:
    """Steps of a diffusers multistep scheduler fed toile's guided velocity as its
    ``flow_prediction`` model output."""

    def advance(i: int, x: torch.Tensor, v: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        return scheduler.step(v, scheduler.timesteps[i], x, return_dict=False)[0].float()

    return advance


def flow_solver(name: str, times: torch.Tensor, device: torch.device | str | None = None) -> Any:
    """A fresh diffusers scheduler that runs sampler ``name`` ("DPM++ 2M": DPM-Solver++(2M), Lu
    et al. 2022; "UniPC": Zhao et al. 2023) through exactly the times ``times``.

    The class and options are toile.samplers' FLOW_SAMPLERS entry (``use_flow_sigmas``,
    ``prediction_type="flow_prediction"``), as the engine builds them for SD3 and FLUX.1, but with
    ``flow_shift`` 1: ``times`` comes from ``time_schedule``, which has already applied the
    model's shift, so the scheduler must not shift again. Its sigmas are then ``times`` (float32,
    ending at 0), cut at ``start`` for img2img exactly as Euler and Heun see it. Each call builds
    a new scheduler, so the solver's history of earlier predictions never leaks between runs.
    """
    import diffusers

    from toile.samplers import FLOW_SAMPLERS

    times = times.detach().to("cpu", torch.float64)
    if len(times) < 2 or float(times[-1]) != 0.0:
        raise ValueError("a multistep solver needs times that end at t = 0")
    entry = next(s for s in FLOW_SAMPLERS if s.name == name)
    scheduler = getattr(diffusers, entry.scheduler_class)(**entry.overrides, flow_shift=1.0)
    steps = len(times) - 1
    if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        # UniPC takes the sigmas before the final 0 (its final_sigmas_type "zero" appends it);
        # it moves a first sigma of exactly 1 down by 1e-6 to keep log(α) finite.
        scheduler.set_timesteps(sigmas=times[:-1].numpy(), device=device)
    else:
        # DPMSolverMultistep (diffusers 0.42) takes only a step count, whose flow sigmas start at
        # 1 − 1/1000: set the step count (which also resets the solver's state), then its sigmas
        # and timesteps to toile's, as its own set_timesteps stores them. σ = 1 (λ = −∞) needs
        # no nudge here: the first step, x' = (σ'/σ)·x − α'·(e^(−h) − 1)·x0 with h = ∞, is
        # σ'·x + α'·x0, finite and exact, and the next step's second-order term is weighted
        # h/h₀ = 0.
        scheduler.set_timesteps(num_inference_steps=steps, device=device)
        scheduler.sigmas = times.to(torch.float32)
        train_steps = scheduler.config.num_train_timesteps
        scheduler.timesteps = (times[:-1] * train_steps).to(device=device, dtype=torch.int64)
    # Step i uses sigmas[i] -> sigmas[i + 1]: count steps from the first, rather than look the
    # integer timesteps up (which a fine schedule may repeat).
    scheduler.set_begin_index(0)
    return scheduler

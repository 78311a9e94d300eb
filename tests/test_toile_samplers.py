"""toile's multistep samplers, DPM++ 2M (DPM-Solver++(2M), Lu et al. 2022) and UniPC (Zhao et al.
2023): its sampling loop against diffusers' schedulers driven by hand on a toy velocity model,
then through the engine on a tiny toile model."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from helpers import max_abs_diff  # noqa: E402
from toile.errors import CancelledError, RequestError  # noqa: E402
from toile.families.toile.sampling import (  # noqa: E402
    SAMPLERS,
    flow_solver,
    forward_noise,
    sample,
    time_schedule,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOLVERS = ("DPM++ 2M", "UniPC")
CLASSES = {"DPM++ 2M": "DPMSolverMultistepScheduler", "UniPC": "UniPCMultistepScheduler"}
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
SHIFT = 3.0
GUIDANCE = 2.5
SHAPE = (2, 3, 4, 4)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# A toy velocity model: a fixed linear map of x, a term in t and the condition (no network).
MIX = torch.randn(3, 3, generator=seeded(10)) * 0.5


def toy_velocity(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    mixed = torch.einsum("dc,bchw->bdhw", MIX, x)
    return mixed + (1.0 - t).view(-1, 1, 1, 1) * 0.3 + cond


def conditions(batch: int = SHAPE[0]) -> tuple[torch.Tensor, torch.Tensor]:
    cond = torch.randn(batch, 3, 1, 1, generator=seeded(11))
    return cond, torch.zeros_like(cond)


def diffusers_scheduler(name: str, steps: int) -> object:
    """The scheduler as SD3/FLUX.1 run it, set up by diffusers itself: the model's shift as its
    ``flow_shift``. UniPC takes FLUX.1's unshifted sigmas, DPM++ 2M its own step count."""
    scheduler = getattr(diffusers, CLASSES[name])(**FLOW, flow_shift=SHIFT)
    if name == "UniPC":
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    else:
        scheduler.set_timesteps(num_inference_steps=steps)
    return scheduler


def by_hand(scheduler: object, x: torch.Tensor, begin: int = 0) -> torch.Tensor:
    """diffusers' denoising loop: guided velocity at the scheduler's sigma, then ``step``."""
    cond, uncond = conditions(x.shape[0])
    scheduler.set_begin_index(begin)
    for i, timestep in enumerate(scheduler.timesteps[begin:], start=begin):
        t = torch.full((x.shape[0],), float(scheduler.sigmas[i]))
        v_cond, v_uncond = toy_velocity(x, t, cond), toy_velocity(x, t, uncond)
        v = v_uncond + GUIDANCE * (v_cond - v_uncond)
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
    return x


def ours(name: str, times: torch.Tensor, noise: torch.Tensor, **kwargs: object) -> torch.Tensor:
    cond, uncond = conditions(noise.shape[0])
    return sample(toy_velocity, noise, cond, times=times, uncond=uncond, guidance=GUIDANCE,
                  cat=torch.cat, method=SAMPLERS[name], **kwargs)


def test_the_samplers_by_name() -> None:
    assert list(SAMPLERS) == ["Euler", "Euler a", "Heun", "DPM++ 2M", "UniPC"]


def test_euler_a_equals_diffusers_stochastic_flow_euler() -> None:
    """toile's Euler a is FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) stepped by
    hand with the same generator: x0 from the velocity, re-noised to the next sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 6
    noise = torch.randn(SHAPE, generator=seeded(3))
    reference = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    reference.set_timesteps(num_inference_steps=steps)
    cond, uncond = conditions(SHAPE[0])
    theirs, generator = noise.clone(), seeded(9)
    for i, timestep in enumerate(reference.timesteps):
        t = torch.full((SHAPE[0],), float(reference.sigmas[i]))
        v_cond, v_uncond = toy_velocity(theirs, t, cond), toy_velocity(theirs, t, uncond)
        v = v_uncond + GUIDANCE * (v_cond - v_uncond)
        theirs = reference.step(v, timestep, theirs, generator=generator, return_dict=False)[0]
    mine_generator = seeded(9)
    got = ours("Euler a", reference.sigmas.double(), noise,  # diffusers' own sigmas
               step_noise=lambda step: torch.randn(SHAPE, generator=mine_generator))
    assert torch.allclose(got, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="step_noise"):
        ours("Euler a", time_schedule(steps), noise)


def test_euler_a_is_offered_only_where_toile_samples_itself() -> None:
    from toile.samplers import SamplerMenu

    assert "Euler a" in [s.name for s in SamplerMenu(
        "FlowMatchEulerDiscreteScheduler", restrict_to=("Euler", "Euler a")).samplers()]
    # SD3's and FLUX.1's pipelines never hand their generator to the scheduler's step
    assert "Euler a" not in [s.name for s in SamplerMenu(
        "FlowMatchEulerDiscreteScheduler").samplers()]


@pytest.mark.parametrize("name", SOLVERS)
def test_shift_maps_onto_diffusers_flow_sigmas(name: str) -> None:
    """toile shifts its times and hands them over with flow_shift 1; that is UniPC's schedule
    with the shift as its flow_shift (FLUX.1's way: unshifted sigmas in, shifted inside)."""
    steps = 6
    theirs = diffusers_scheduler("UniPC", steps).sigmas
    mine = flow_solver(name, time_schedule(steps, shift=SHIFT)).sigmas
    assert mine.dtype == torch.float32 and len(mine) == steps + 1 and float(mine[-1]) == 0.0
    # UniPC moves a first sigma of exactly 1 down by 1e-6 (log α finite); DPM++ 2M needs not
    assert torch.allclose(mine, theirs, rtol=0, atol=2e-6)
    assert torch.equal(mine[1:], theirs[1:])


@pytest.mark.parametrize("name", SOLVERS)
def test_txt2img_equals_diffusers_scheduler_by_hand(name: str) -> None:
    steps = 6
    noise = torch.randn(SHAPE, generator=seeded(0))
    reference = diffusers_scheduler(name, steps)
    want = by_hand(reference, noise.clone())
    # DPM++ 2M: diffusers' own schedule (which starts at 1 − 1/1000), given as toile's times
    times = time_schedule(steps, shift=SHIFT) if name == "UniPC" else reference.sigmas.double()
    got = ours(name, times, noise)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SOLVERS)
def test_img2img_cut_equals_diffusers_begin_index(name: str) -> None:
    """A schedule cut at strength is diffusers' img2img start (``set_begin_index``) with fresh
    solver state, not the tail of a full run."""
    steps, begin = 10, 4
    noise = torch.randn(SHAPE, generator=seeded(1))
    x0 = torch.randn(SHAPE, generator=seeded(2)).clamp(-1, 1)
    reference = diffusers_scheduler(name, steps)
    start = float(reference.sigmas[begin])
    want = by_hand(reference, forward_noise(x0, noise, torch.tensor(start)), begin)
    if name == "UniPC":  # time_schedule's own cut at strength = that sigma
        times = time_schedule(steps, shift=SHIFT, start=float(time_schedule(steps,
                                                                             shift=SHIFT)[begin]))
        assert len(times) == steps - begin + 1
    else:
        times = reference.sigmas[begin:].double()
    got = ours(name, times, noise, x0_known=x0)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours(name, times, noise, x0_known=x0), got)  # no state carried over


@pytest.mark.parametrize("name", SOLVERS)
def test_steps_callback_conditions_and_cancellation(name: str) -> None:
    noise = torch.randn(SHAPE, generator=seeded(3))
    times = time_schedule(5, shift=SHIFT)
    cond, uncond = conditions()
    asked, seen = [], []

    def cond_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append(step)
        return (cond if step <= 2 else -cond), uncond

    edited = ours(name, times, noise, cond_at=cond_at,
                  callback=lambda step, total, x: seen.append((step, total)))
    assert asked == [1, 2, 3, 4, 5] and seen == [(s, 5) for s in range(1, 6)]
    assert not torch.allclose(edited, ours(name, times, noise))  # the switch took effect
    calls = []

    def counting(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(float(t[0]))
        return toy_velocity(x, t, c)

    def stop(step: int, total: int, x: torch.Tensor) -> None:
        if step == 2:
            raise CancelledError("cancelled")

    with pytest.raises(CancelledError):
        sample(counting, noise, cond, times=times, method=SAMPLERS[name], callback=stop)
    assert len(calls) == 2  # one model call per step, none after the cancelling step


def test_solvers_integrate_a_gaussian_flow_better_than_euler() -> None:
    """Data N(m, s²): the exact flow maps noise ε to m + s·ε; the optimal velocity is known."""
    m, s = 0.7, 0.3

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        t = t.view(-1, 1, 1, 1).double()
        a = 1.0 - t
        x0 = m + a * s**2 / (a**2 * s**2 + t**2) * (x.double() - a * m)  # E[x0 | x_t]
        return ((x.double() - x0) / t).float()

    noise = torch.randn(SHAPE, generator=seeded(4))
    exact = m + s * noise
    times = time_schedule(8)
    euler = (sample(velocity, noise, None, times=times) - exact).abs().max()
    for name in SOLVERS:
        err = (sample(velocity, noise, None, times=times, method=SAMPLERS[name]) - exact).abs()
        assert err.max() < euler / 1.5, name


# ------------------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def model(text_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from finetune_common import make_tiny_toile

    return str(make_tiny_toile(tmp_path_factory.mktemp("toile") / "tiny", text_folder))


@pytest.fixture(scope="module")
def engine():
    from toile.engine.engine import Engine

    return Engine(device="cpu", cache_size=2)


def run(engine, model: str, **kwargs: object):
    from toile.request import GenerationRequest

    fields = {"prompt": "a red circle", "model": model, "steps": 4, "seed": 1} | kwargs
    return engine.run(GenerationRequest(**fields))


@pytest.mark.parametrize("name", [*SOLVERS, "Euler a"])
def test_engine_is_deterministic_and_records_the_sampler(engine, model: str, name: str) -> None:
    from toile.io.metadata import a1111_parameters

    first, again = run(engine, model, sampler=name), run(engine, model, sampler=name)
    euler = run(engine, model, sampler="Euler")
    assert max_abs_diff(first.images[0], again.images[0]) == 0
    assert max_abs_diff(first.images[0], euler.images[0]) > 0
    assert first.records[0].sampler == name
    assert f"Sampler: {name}" in a1111_parameters(first.records[0])


@pytest.mark.parametrize("name", [*SOLVERS, "Euler a"])
def test_engine_batch_equals_singles(engine, model: str, name: str) -> None:
    batch = run(engine, model, sampler=name, num_images=2)
    singles = [run(engine, model, sampler=name, seed=seed).images[0] for seed in (1, 2)]
    for got, want in zip(batch.images, singles, strict=True):
        assert max_abs_diff(got, want) <= 1  # batched matmuls may round differently


@pytest.mark.parametrize("name", SOLVERS)
def test_engine_img2img_and_prompt_editing(engine, model: str, name: str) -> None:
    source = Image.new("RGB", (16, 16), (200, 30, 30))
    src = np.asarray(source, dtype=np.float32)
    light = run(engine, model, sampler=name, image=source, strength=0.2, steps=8).images[0]
    heavy = run(engine, model, sampler=name, image=source, strength=1.0, steps=8).images[0]
    assert light.size == source.size
    assert np.abs(np.asarray(light) - src).mean() < np.abs(np.asarray(heavy) - src).mean()
    edited = run(engine, model, sampler=name, prompt="[a red circle:a blue square:2]")
    plain = run(engine, model, sampler=name)
    assert max_abs_diff(edited.images[0], plain.images[0]) > 0


def test_engine_cancels_and_refuses_what_toile_lacks(engine, model: str) -> None:
    cancel = threading.Event()
    cancel.set()
    from toile.request import GenerationRequest

    with pytest.raises(CancelledError):
        engine.run(GenerationRequest("x", model=model, steps=2, seed=1, sampler="UniPC"),
                   cancel=cancel)
    with pytest.raises(RequestError) as info:
        run(engine, model, sampler="DDIM")
    assert info.value.field == "sampler"
    assert "it can use: Euler, Euler a, Heun, DPM++ 2M, UniPC" in str(info.value)

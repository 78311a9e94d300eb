"""Samplers and schedules: one name everywhere, the menus per family, parity with diffusers'
documented scheduler swap (``cls.from_config(pipe.scheduler.config, ...)``) and clear errors."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_same_image, max_abs_diff
from toile.engine.engine import Engine
from toile.errors import RequestError
from toile.request import GenerationRequest
from toile.samplers import SamplerMenu, Schedule, parse_schedule, sampler_name

STEPS = 3


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", cache_size=4)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def swapped(pipe, class_name: str, **overrides):
    """diffusers' own way to change a pipeline's sampler."""
    import diffusers

    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    return pipe


def test_one_name_per_sampler_and_legacy_spellings():
    assert sampler_name("EulerDiscreteScheduler") == sampler_name(
        "FlowMatchEulerDiscreteScheduler") == "Euler"
    assert sampler_name("DPMSolverMultistepScheduler") == "DPM++ 2M"
    assert sampler_name(None) == "Default"
    assert parse_schedule("Karras") is Schedule.KARRAS
    assert parse_schedule("SGM Uniform") is Schedule.SGM_UNIFORM
    menu = SamplerMenu("EulerDiscreteScheduler")
    choice = menu.choose("DPM++ 2M Karras", None)  # A1111 < 1.9 named both together
    assert (choice.name, choice.schedule) == ("DPM++ 2M", Schedule.KARRAS)
    assert menu.choose("k_euler_a", None).name == "Euler a"
    assert menu.choose("DDIMScheduler", None).name == "DDIM"
    assert menu.choose("default", None).name == "Euler"  # the checkpoint's own
    assert menu.choose(None, None).name == menu.choose("Default", "automatic").name == "Euler"


@pytest.mark.parametrize(
    ("sampler", "schedule", "class_name", "overrides"),
    [
        ("Euler a", None, "EulerAncestralDiscreteScheduler", {}),
        ("DPM++ 2M", "karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("DPM++ 2M SDE", None, "DPMSolverMultistepScheduler",
         {"algorithm_type": "sde-dpmsolver++"}),
        ("UniPC", "sgm_uniform", "UniPCMultistepScheduler", {"timestep_spacing": "trailing"}),
        ("PLMS", None, "PNDMScheduler", {"skip_prk_steps": True}),
    ],
)
def test_sd_sampler_parity(engine, tiny_models, sampler, schedule, class_name, overrides):
    from diffusers import StableDiffusionPipeline

    path = tiny_models("sd")
    request = GenerationRequest("a red cat", model=str(path), steps=STEPS, seed=5,
                                sampler=sampler, schedule=schedule)
    ours = engine.run(request)
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = swapped(pipe, class_name, **overrides)(
        "a red cat", num_inference_steps=STEPS, generator=seeded(5)).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.sampler, record.schedule) == (sampler, schedule or "automatic")
    default = engine.run(GenerationRequest("a red cat", model=str(path), steps=STEPS, seed=5))
    assert max_abs_diff(default.images[0], ours.images[0]) > 0  # the swap really happened
    # the checkpoint's own scheduler is back for the next request
    loaded = engine.load(str(path)).loaded
    assert type(loaded.pipelines["txt2img"].scheduler).__name__ == "DDIMScheduler"  # its own


def test_sdxl_heun_parity(engine, tiny_models):
    from diffusers import StableDiffusionXLPipeline

    path = tiny_models("sdxl")
    ours = engine.run(GenerationRequest("a cat", model=str(path), steps=STEPS, seed=2,
                                        sampler="Heun", schedule="exponential"))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = swapped(pipe, "HeunDiscreteScheduler", use_exponential_sigmas=True)(
        "a cat", num_inference_steps=STEPS, generator=seeded(2)).images[0]
    assert_same_image(ours.images[0], ref)


@pytest.mark.parametrize(
    ("sampler", "class_name", "overrides"),
    [
        ("Heun", "FlowMatchHeunDiscreteScheduler", {}),
        ("DPM++ 2M", "DPMSolverMultistepScheduler",
         {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": None}),
    ],
)
def test_sd3_flow_sampler_parity(engine, tiny_models, sampler, class_name, overrides):
    from diffusers import StableDiffusion3Pipeline

    path = tiny_models("sd3")
    ours = engine.run(GenerationRequest("a cat", model=str(path), steps=STEPS, seed=4,
                                        sampler=sampler))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    if "flow_shift" in overrides:
        overrides = {**overrides, "flow_shift": pipe.scheduler.config.shift}
    ref = swapped(pipe, class_name, **overrides)(
        "a cat", num_inference_steps=STEPS, generator=seeded(4)).images[0]
    assert_same_image(ours.images[0], ref)
    assert ours.records[0].sampler == sampler


def test_flux_takes_only_schedulers_that_accept_its_sigmas(engine, tiny_models):
    from diffusers import FluxPipeline

    path = tiny_models("flux_dev")
    with pytest.raises(RequestError) as info:
        engine.run(GenerationRequest("a cat", model=str(path), steps=2, seed=1, sampler="Heun"))
    assert info.value.field == "sampler" and "Euler, UniPC" in str(info.value)
    ours = engine.run(GenerationRequest("a cat", model=str(path), steps=2, seed=1,
                                        width=32, height=32, sampler="UniPC"))
    pipe = FluxPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    ref = swapped(pipe, "UniPCMultistepScheduler", use_flow_sigmas=True,
                  prediction_type="flow_prediction", flow_shift=pipe.scheduler.config.shift)(
        "a cat", num_inference_steps=2, generator=seeded(1), width=32, height=32).images[0]
    assert_same_image(ours.images[0], ref)


def test_errors_list_what_applies(engine, tiny_models):
    sd3 = str(tiny_models("sd3"))
    with pytest.raises(RequestError) as info:
        engine.run(GenerationRequest("x", model=sd3, steps=1, sampler="Euler a"))
    assert info.value.field == "sampler"
    assert "it can use: Euler, Heun, DPM++ 2M, UniPC" in str(info.value)
    with pytest.raises(RequestError) as info:
        engine.run(GenerationRequest("x", model=sd3, steps=1, sampler="Heun", schedule="karras"))
    assert info.value.field == "schedule" and "it can use: automatic" in str(info.value)
    with pytest.raises(RequestError, match="sampler: unknown sampler 'Eulr'"):
        GenerationRequest("x", sampler="Eulr")
    with pytest.raises(RequestError, match="schedule: unknown schedule 'polyexp'"):
        GenerationRequest("x", schedule="polyexp")


def test_toile_heun_integrates_better_than_euler_at_equal_steps():
    """Heun (2nd order) at n steps lands closer to a fine Euler solution than Euler at n."""
    from toile.families.toile.sampling import sample, time_schedule

    def velocity(x, t, cond):  # a curved flow: dx/dt = x·cos(3t)
        return x * torch.cos(3 * t).view(-1, 1, 1, 1)

    noise = torch.randn(2, 3, 4, 4, generator=seeded(0))
    exact = sample(velocity, noise, None, times=time_schedule(2000))
    euler = sample(velocity, noise, None, times=time_schedule(8))
    heun = sample(velocity, noise, None, times=time_schedule(8), method="heun")
    assert (heun - exact).abs().max() < (euler - exact).abs().max() / 4


def test_toile_mini_samplers(engine):
    euler = engine.run(GenerationRequest("a red circle on a blue background", seed=3, steps=6))
    heun = engine.run(GenerationRequest("a red circle on a blue background", seed=3, steps=6,
                                        sampler="Heun"))
    assert max_abs_diff(euler.images[0], heun.images[0]) > 0
    assert (heun.records[0].sampler, euler.records[0].sampler) == ("Heun", "Euler")
    with pytest.raises(RequestError, match="it can use: Euler, Euler a, Heun, DPM.. 2M, UniPC"):
        engine.run(GenerationRequest("x", steps=1, sampler="DDIM"))


def test_cli_sampler_flags_and_listing(toile_home, tmp_path, tiny_models):
    import json

    from test_cli import toile

    out = json.loads(toile("generate", "a red circle on a blue background", "--steps", "2",
                           "--sampler", "Heun", "-o", str(tmp_path / "h.png"), "--json",
                           home=toile_home).stdout)
    assert out["images"][0]["record"]["sampler"] == "Heun"
    bad = toile("generate", "x", "--sampler", "DDIM", "-o", str(tmp_path / "x.png"),
                home=toile_home, check=False)
    assert bad.returncode == 2 and "sampler: 'DDIM' does not apply" in bad.stderr
    assert "Euler, Euler a, Heun" in bad.stderr and "Traceback" not in bad.stderr
    listing = toile("samplers", str(tiny_models("sd")), home=toile_home).stdout.splitlines()
    assert listing[0].split()[:2] == ["DEFAULT", "SAMPLER"]
    assert any(line.startswith("*") and "DDIM" in line for line in listing)  # its own
    assert any("DPM++ 2M SDE" in line and "karras" in line for line in listing)

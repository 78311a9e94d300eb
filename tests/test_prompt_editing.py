"""A1111 prompt editing and alternation during sampling: SD and SDXL switch their embeddings
between steps (checked against hand-made diffusers runs that swap ``encode_prompt``'s embeddings
in their own step callback), toile's own loop switches its text conditioning, the families that
cannot refuse, and the record keeps the prompt as written with its schedule."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_common import make_tiny_toile
from helpers import assert_same_image, center_mask, gradient_image, max_abs_diff
from toile.engine.engine import Engine
from toile.errors import RequestError
from toile.request import GenerationRequest
from toile.result import ImageRecord

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3
GUIDANCE = {"sd": 7.5, "sdxl": 5.0}
CAT, DOG = "a red cat", "a blue dog"
# Run = (last step, prompt, negative prompt), steps counted from 1 over the steps that run.
Run = tuple[int, str, str]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", cache_size=3)


def generate(engine: Engine, model: Path, prompt: str, **fields: Any):
    fields = {"steps": STEPS, "seed": 3, "guidance": GUIDANCE.get(Path(model).name)} | fields
    return engine.run(GenerationRequest(prompt, model=str(model), **fields))


@functools.cache
def diffusers_pipe(family: str, model: Path, role: str = "txt2img") -> Any:
    import diffusers

    name = {"sd": "StableDiffusion", "sdxl": "StableDiffusionXL"}[family]
    suffix = {"txt2img": "Pipeline", "img2img": "Img2ImgPipeline",
              "inpaint": "InpaintPipeline"}[role]
    options = ({"safety_checker": None, "requires_safety_checker": False} if family == "sd"
               else {"add_watermarker": False})
    pipe = getattr(diffusers, name + suffix).from_pretrained(str(model), **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe: Any, prompt: str, negative: str) -> dict[str, torch.Tensor]:
    """diffusers' own embeddings for one image (an empty negative: none given)."""
    out = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                             do_classifier_free_guidance=True, negative_prompt=negative or None)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds"]
    return dict(zip(names, out, strict=False))


def hand_made(pipe: Any, runs: list[Run], seed: int, **call: Any) -> Any:
    """The pipeline with a callback of our own that sets step s's embeddings after step s - 1
    (laid out as the loop holds them under guidance: cat([negative, positive]))."""
    encoded = [encode(pipe, prompt, negative) for _, prompt, negative in runs]
    sdxl = "pooled_prompt_embeds" in encoded[0]

    def at(step: int) -> dict[str, torch.Tensor]:
        return encoded[next((k for k, run in enumerate(runs) if step <= run[0]), -1)]

    def callback(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        e = at(i + 2)  # iteration i + 1 is step i + 2
        out = {"prompt_embeds": torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]])}
        if sdxl:
            out["add_text_embeds"] = torch.cat([e["negative_pooled_prompt_embeds"],
                                                e["pooled_prompt_embeds"]])
        return out

    inputs = ["latents", "prompt_embeds"] + (["add_text_embeds"] if sdxl else [])
    return pipe(**encoded[0], **call, generator=torch.Generator("cpu").manual_seed(seed),
                callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=inputs).images[0]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def family(request, tiny_models) -> tuple[str, Path]:
    return request.param, tiny_models(request.param)


# --- SD and SDXL ----------------------------------------------------------------------------


def test_a_schedule_that_never_switches_is_the_plain_prompt(engine, family):
    _, model = family
    plain = generate(engine, model, CAT)
    for prompt in (f"[{CAT}:{DOG}:1.0]", f"[{CAT}:{DOG}:9]", f"[{DOG}:{CAT}:0]"):
        assert max_abs_diff(generate(engine, model, prompt).images[0], plain.images[0]) == 0


@pytest.mark.parametrize(("prompt", "runs"), [
    (f"[{CAT}:{DOG}:1]", [(1, CAT, ""), (3, DOG, "")]),
    ("a [red cat:blue dog:0.7]", [(2, CAT, ""), (3, DOG, "")]),  # int(0.7 * 3) = 2
    (f"[{CAT}|{DOG}]", [(1, CAT, ""), (2, DOG, ""), (3, CAT, "")]),
])
def test_switch_equals_a_hand_made_diffusers_run(engine, family, prompt, runs):
    name, model = family
    events = []
    ours = engine.run(GenerationRequest(prompt, model=str(model), steps=STEPS, seed=3,
                                        guidance=GUIDANCE[name]), progress=events.append)
    assert [event.step for event in events] == [1, 2, 3]  # progress still reported per step
    ref = hand_made(diffusers_pipe(name, model), runs, 3, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE[name])
    assert_same_image(ours.images[0], ref)
    for plain in (CAT, DOG):  # it did switch: neither prompt alone makes it
        assert max_abs_diff(ours.images[0], generate(engine, model, plain).images[0]) > 0


def test_negative_prompt_editing(engine, family):
    name, model = family
    ours = generate(engine, model, CAT, negative_prompt="[blurry:ugly:1]")
    ref = hand_made(diffusers_pipe(name, model), [(1, CAT, "blurry"), (3, CAT, "ugly")], 3,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE[name])
    assert_same_image(ours.images[0], ref)
    blurry = generate(engine, model, CAT, negative_prompt="blurry")
    assert max_abs_diff(ours.images[0], blurry.images[0]) > 0
    record = ours.records[0]
    assert record.negative_prompt == "[blurry:ugly:1]" and record.prompt_schedule == ()
    assert record.negative_prompt_schedule == ((1, "blurry"), (3, "ugly"))


def test_alternation_with_emphasis_and_batch_equals_singles(engine, family):
    _, model = family
    prompt = f"[(a red:1.4) cat|{DOG}]"
    batch = generate(engine, model, prompt, num_images=2)
    for image, seed in zip(batch.images, (3, 4), strict=True):
        assert_same_image(image, generate(engine, model, prompt, seed=seed).images[0])
    for plain in (CAT, DOG, "(a red:1.4) cat"):
        assert max_abs_diff(batch.images[0], generate(engine, model, plain).images[0]) > 0
    record = batch.records[0]
    assert record.prompt == prompt
    assert record.prompt_schedule == ((1, "(a red:1.4) cat"), (2, DOG), (3, "(a red:1.4) cat"))
    assert record.prompt_weights == (("a red", 1.4), (" cat", 1.0))  # the first run's
    assert ImageRecord.from_json(record.to_json()) == record


def test_img2img_counts_the_steps_that_run(engine, family):
    # strength 0.5 of 4 steps runs 2: the schedule's steps 1 and 2 (A1111 counts what runs).
    name, model = family
    init = gradient_image(32, 32)
    ours = generate(engine, model, f"[{CAT}:{DOG}:1]", steps=4, image=init, strength=0.5)
    ref = hand_made(diffusers_pipe(name, model, "img2img"), [(1, CAT, ""), (4, DOG, "")], 3,
                    image=init, strength=0.5, num_inference_steps=4,
                    guidance_scale=GUIDANCE[name])
    assert_same_image(ours.images[0], ref)
    plain = generate(engine, model, CAT, steps=4, image=init, strength=0.5)
    assert max_abs_diff(ours.images[0], plain.images[0]) > 0


def test_inpaint_switches_too(engine, family):
    from toile.engine.outpaint import composite

    name, model = family
    init, mask = gradient_image(32, 32), center_mask(32, 32)
    ours = generate(engine, model, f"[{CAT}:{DOG}:2]", image=init, mask=mask)
    ref = hand_made(diffusers_pipe(name, model, "inpaint"), [(2, CAT, ""), (3, DOG, "")], 3,
                    image=init, mask_image=mask, width=32, height=32, strength=1.0,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE[name])
    assert_same_image(ours.images[0], composite(ref, init, mask))  # toile keeps unmasked pixels
    never = generate(engine, model, f"[{CAT}:{DOG}:1.0]", image=init, mask=mask)
    plain = generate(engine, model, CAT, image=init, mask=mask)
    assert max_abs_diff(never.images[0], plain.images[0]) == 0


def test_refiner_continues_the_count(engine, tiny_models):
    """The base runs the schedule's first steps, the refiner the rest: switching exactly where
    the base hands over is the base with one prompt and the refiner with the other."""
    base, refiner = tiny_models("sdxl"), tiny_models("sdxl_refiner")
    steps, switch = 4, 0.5
    base_pipe = diffusers_pipe("sdxl", base)
    refiner_pipe = diffusers_pipe("sdxl", refiner, "img2img")
    generator = torch.Generator("cpu").manual_seed(3)
    latents = base_pipe(CAT, num_inference_steps=steps, guidance_scale=5.0,
                        denoising_end=switch, output_type="latent", generator=generator).images
    handed = base_pipe.num_timesteps  # Euler: one model call per step
    ref = refiner_pipe(DOG, image=latents, num_inference_steps=steps, guidance_scale=5.0,
                       denoising_start=switch, generator=generator).images[0]

    def with_refiner(prompt: str):
        return generate(engine, base, prompt, steps=steps, guidance=5.0,
                        refiner=str(refiner), refiner_switch=switch)

    ours = with_refiner(f"[{CAT}:{DOG}:{handed}]")
    assert_same_image(ours.images[0], ref)
    assert max_abs_diff(with_refiner(f"[{CAT}:{DOG}:1.0]").images[0],
                        with_refiner(CAT).images[0]) == 0


def test_edit_task_refuses_prompt_editing(engine, tiny_models):
    with pytest.raises(RequestError) as info:
        engine.run(GenerationRequest("make it [red|blue]", task="edit", steps=2,
                                     image=gradient_image(32, 32),
                                     model=str(tiny_models("sd_ip2p"))))
    assert info.value.field == "prompt" and "edit task" in str(info.value)


# --- families that cannot ------------------------------------------------------------------


def test_families_without_per_step_conditioning_refuse(engine, tiny_models):
    from toile.engine.records import prompt_syntax
    from toile.families.deepfloyd_if import IFFamily
    from toile.families.flux import FluxFamily
    from toile.families.resize import ResizeFamily
    from toile.families.sd3 import SD3Family
    from toile.families.sd_upscale import SDUpscaleFamily

    for family in (SD3Family(), FluxFamily(), IFFamily(), SDUpscaleFamily()):
        with pytest.raises(RequestError) as info:
            prompt_syntax(family, GenerationRequest("a [cat|dog]"))
        assert info.value.field == "prompt" and f"the {family.name} family" in str(info.value)
        with pytest.raises(RequestError) as info:
            prompt_syntax(family, GenerationRequest("a cat", negative_prompt="[x::2]"))
        assert info.value.field == "negative_prompt"
    prompt_syntax(ResizeFamily(), GenerationRequest("a [cat|dog]"))  # reads no prompt
    with pytest.raises(RequestError, match="sd3 family"):
        generate(engine, tiny_models("sd3"), "a [cat:dog:1]", steps=2)


# --- toile's own model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def toile_model(tmp_path_factory, text_folder) -> Path:
    return make_tiny_toile(tmp_path_factory.mktemp("toile") / "model", text_folder)


def test_toile_switches_its_text_conditioning(engine, toile_model):
    red, blue = "a red circle", "a blue square"
    plain = generate(engine, toile_model, red, guidance=3.0)
    never = generate(engine, toile_model, f"[({red}:1.3):{blue}:1.0]", guidance=3.0)
    assert max_abs_diff(never.images[0], plain.images[0]) == 0  # plain words, never switched
    switched = generate(engine, toile_model, f"[{red}:{blue}:1]", guidance=3.0)
    again = generate(engine, toile_model, f"[{red}:{blue}:1]", guidance=3.0)
    assert max_abs_diff(switched.images[0], again.images[0]) == 0  # deterministic
    blue_only = generate(engine, toile_model, blue, guidance=3.0)
    for other in (plain, blue_only):
        assert max_abs_diff(switched.images[0], other.images[0]) > 0
    record = switched.records[0]
    assert record.prompt == f"[{red}:{blue}:1]"
    assert record.prompt_schedule == ((1, red), (3, blue))
    note = generate(engine, toile_model, f"[({red}:1.3)|{blue}]").records[0].prompt_note
    assert "plain words" in note


def test_toile_pipeline_prompt_steps(toile_model):
    from toile.families.toile.pipeline import ToilePipeline

    pipe = ToilePipeline.from_pretrained(toile_model)
    common = {"seeds": [5], "steps": 3, "guidance": 3.0}
    plain = pipe(["a cat"], negative_prompt="ugly", **common)
    one_run = pipe(["ignored"], prompt_steps=[(3, "a cat", "ugly")], **common)
    assert max_abs_diff(plain[0], one_run[0]) == 0
    negative_switch = pipe(["a cat"], prompt_steps=[(1, "a cat", "ugly"), (3, "a cat", "")],
                           **common)
    assert max_abs_diff(plain[0], negative_switch[0]) > 0
    with pytest.raises(RequestError) as info:
        pipe(["a cat"], prompt_steps=[(2, "a", ""), (1, "b", "")], **common)
    assert info.value.field == "prompt_steps"


def test_switch_counts_sampler_steps_and_lays_out_the_batch():
    """Loop iteration i is followed by sampler step offset + (i + 1) // order + 1 (Heun: two
    iterations a step); the next step's embeddings go back as cat([negative, positive]) per
    image, once, when the text changes."""
    from types import SimpleNamespace

    from toile.families.clip_prompts import PromptSwitch

    def embeddings(value: float) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": torch.full((1, 2, 3), value),
                "negative_prompt_embeds": torch.full((1, 2, 3), -1.0)}

    guided = SimpleNamespace(do_classifier_free_guidance=True)
    tensors = {"prompt_embeds": torch.zeros(4, 2, 3)}  # two images under guidance
    switch = PromptSwitch([(1, embeddings(1.0)), (3, embeddings(2.0))], order=2)
    assert switch(guided, 0, None, tensors) == {}  # Heun's second evaluation of step 1 is next
    out = switch(guided, 1, None, tensors)["prompt_embeds"]
    assert torch.equal(out, torch.cat([torch.full((2, 2, 3), -1.0), torch.full((2, 2, 3), 2.0)]))
    assert switch(guided, 2, None, tensors) == {}
    # A refiner that takes over after the base's 2 steps runs step 3, then step 4.
    refiner = PromptSwitch([(3, embeddings(2.0)), (4, embeddings(3.0))], offset=2)
    unguided = SimpleNamespace(do_classifier_free_guidance=False)
    out = refiner(unguided, 0, None, {"prompt_embeds": torch.zeros(2, 2, 3)})["prompt_embeds"]
    assert torch.equal(out, torch.full((2, 2, 3), 3.0))

"""FLUX.1 (dev, schnell, Fill): detection, parity with diffusers, properties, errors.

Parity calls give diffusers every value explicitly (guidance, sequence length, size, strength),
because its Flux pipelines' call defaults (guidance 3.5 / 7.0, strength 0.6, 1024 px) are not the
variant defaults toile resolves. Inpaint parity compares against diffusers' output with the
input overlaid outside the mask, which the engine does for every family.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_same_image, center_mask, gradient_image, max_abs_diff, unmasked_diff
from toile.engine.engine import Engine
from toile.errors import ModelFormatError, RequestError, UnsupportedModeError
from toile.request import GenerationRequest, LoraSpec, Outpaint

STEPS = 2
SIZE = 32
PROMPT = "a red cat on the sky"


@pytest.fixture(scope="module")
def dev(tiny_models):
    return tiny_models("flux_dev")


@pytest.fixture(scope="module")
def schnell(tiny_models):
    return tiny_models("flux_schnell")


@pytest.fixture(scope="module")
def fill(tiny_models):
    return tiny_models("flux_fill")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", cache_size=3)


@pytest.fixture(scope="module")
def reference(dev):
    """diffusers' own FluxPipeline on the same folder, loaded once."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(dev))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def derived(cls, base):
    pipe = cls.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_variants_detected_with_their_defaults(engine, dev, schnell, fill):
    expected = {
        dev: ("dev", 28, 3.5, {"txt2img", "img2img", "inpaint", "outpaint"}),
        schnell: ("schnell", 4, 0.0, {"txt2img", "img2img", "inpaint", "outpaint"}),
        fill: ("fill", 50, 30.0, {"inpaint", "outpaint"}),
    }
    for path, (variant, steps, guidance, modes) in expected.items():
        cached = engine.load(str(path))
        assert cached.family.name == "flux"
        assert cached.family.variant(path) == variant
        defaults = cached.loaded.defaults
        assert cached.loaded.variant == variant
        assert (defaults.steps, defaults.guidance) == (steps, guidance)
        assert {m.value for m in defaults.modes} == modes
        # 128 (diffusers' default_sample_size) x VAE scale 2; multiple = scale 2 x 2x2 packing
        assert (defaults.width, defaults.height, defaults.size_multiple) == (256, 256, 4)
    assert engine.load(str(dev)).loaded.defaults.strength == 0.6


def test_txt2img_parity_dev(engine, dev, reference):
    ours = engine.run(
        GenerationRequest(PROMPT, model=str(dev), width=SIZE, height=SIZE, steps=STEPS, seed=7)
    )
    ref = reference(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        width=SIZE,
        height=SIZE,
        max_sequence_length=512,
        generator=seeded(7),
    ).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.family, record.variant, record.mode) == ("flux", "dev", "txt2img")
    assert (record.seed, record.steps, record.guidance, record.width) == (7, STEPS, 3.5, SIZE)


def test_txt2img_parity_schnell(engine, schnell):
    from diffusers import FluxPipeline

    ours = engine.run(
        GenerationRequest(PROMPT, model=str(schnell), width=SIZE, height=24, steps=STEPS, seed=2)
    )
    pipe = FluxPipeline.from_pretrained(str(schnell))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=0.0,
        width=SIZE,
        height=24,
        max_sequence_length=256,
        generator=seeded(2),
    ).images[0]
    assert ours.images[0].size == (SIZE, 24)
    assert_same_image(ours.images[0], ref)
    assert (ours.records[0].variant, ours.records[0].guidance) == ("schnell", 0.0)


def test_img2img_parity(engine, dev, reference):
    from diffusers import FluxImg2ImgPipeline

    init = gradient_image(SIZE, SIZE)
    ours = engine.run(
        GenerationRequest(PROMPT, model=str(dev), steps=3, seed=3, image=init, strength=0.7)
    )
    ref = derived(FluxImg2ImgPipeline, reference)(
        PROMPT,
        image=init,
        strength=0.7,
        num_inference_steps=3,
        guidance_scale=3.5,
        width=SIZE,
        height=SIZE,
        max_sequence_length=512,
        generator=seeded(3),
    ).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.mode, record.strength, record.seed) == ("img2img", 0.7, 3)


def test_inpaint_parity_and_keeps_unmasked(engine, dev, reference):
    from diffusers import FluxInpaintPipeline

    init, mask = gradient_image(SIZE, SIZE, seed=1), center_mask(SIZE, SIZE)
    ours = engine.run(
        GenerationRequest(PROMPT, model=str(dev), steps=STEPS, seed=5, image=init, mask=mask)
    )
    ref = derived(FluxInpaintPipeline, reference)(
        PROMPT,
        image=init,
        mask_image=mask,
        strength=1.0,
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        width=SIZE,
        height=SIZE,
        max_sequence_length=512,
        generator=seeded(5),
    ).images[0]
    assert_same_image(ours.images[0], Image.composite(ref, init, mask))
    assert unmasked_diff(ours.images[0], init, mask) == 0.0
    assert max_abs_diff(ours.images[0], init) > 10  # the masked square was repainted
    assert (ours.records[0].mode, ours.records[0].strength) == ("inpaint", 1.0)


def test_fill_inpaint_parity(engine, fill):
    from diffusers import FluxFillPipeline

    init, mask = gradient_image(SIZE, SIZE, seed=2), center_mask(SIZE, SIZE)
    ours = engine.run(
        GenerationRequest(PROMPT, model=str(fill), steps=STEPS, seed=4, image=init, mask=mask)
    )
    pipe = FluxFillPipeline.from_pretrained(str(fill))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        PROMPT,
        image=init,
        mask_image=mask,
        num_inference_steps=STEPS,
        guidance_scale=30.0,
        width=SIZE,
        height=SIZE,
        max_sequence_length=512,
        generator=seeded(4),
    ).images[0]
    assert_same_image(ours.images[0], Image.composite(ref, init, mask))
    assert unmasked_diff(ours.images[0], init, mask) == 0.0
    record = ours.records[0]
    assert (record.family, record.variant, record.guidance) == ("flux", "fill", 30.0)


def test_fill_refuses_txt2img_and_img2img(engine, fill):
    with pytest.raises(UnsupportedModeError, match="txt2img is not supported by the flux"):
        engine.run(GenerationRequest(PROMPT, model=str(fill), steps=1))
    with pytest.raises(UnsupportedModeError, match="img2img"):
        engine.run(
            GenerationRequest(PROMPT, model=str(fill), steps=1, image=gradient_image(SIZE, SIZE))
        )


@pytest.mark.parametrize("variant", ["dev", "fill"])
def test_outpaint_keeps_original_exactly(engine, variant, dev, fill):
    init = gradient_image(16, 24)
    result = engine.run(
        GenerationRequest(
            PROMPT,
            model=str(dev if variant == "dev" else fill),
            steps=STEPS,
            seed=1,
            image=init,
            outpaint=Outpaint(left=8, top=0, right=8, bottom=8),
        )
    )
    out = result.images[0]
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out)[0:24, 8:24], np.asarray(init))
    assert (result.records[0].mode, result.records[0].outpaint) == ("outpaint", (8, 0, 8, 8))


def test_same_seed_same_image_and_batch_equals_singles(engine, dev):
    def request(seed: int, num_images: int = 1) -> GenerationRequest:
        return GenerationRequest(
            PROMPT, model=str(dev), width=SIZE, height=SIZE, steps=STEPS, seed=seed,
            num_images=num_images,
        )

    batch = engine.run(request(11, num_images=2))
    assert [r.seed for r in batch.records] == [11, 12]
    for image, record in zip(batch.images, batch.records, strict=True):
        assert_same_image(image, engine.run(request(record.seed)).images[0])
    first, again = engine.run(request(11)), engine.run(request(11))
    assert max_abs_diff(first.images[0], again.images[0]) == 0
    assert max_abs_diff(batch.images[0], batch.images[1]) > 2  # different seeds differ


def test_negative_prompt_is_a_request_error(engine, dev):
    request = GenerationRequest(
        PROMPT, negative_prompt="blue", model=str(dev), steps=1, width=SIZE, height=SIZE
    )
    with pytest.raises(RequestError, match="negative_prompt: FLUX.1 has no negative") as info:
        engine.run(request)
    assert info.value.field == "negative_prompt"


def test_size_errors(engine, dev):
    with pytest.raises(RequestError, match="width: 34 must be a multiple of 4") as info:
        engine.run(GenerationRequest(PROMPT, model=str(dev), width=34, height=SIZE, steps=1))
    assert info.value.field == "width"
    with pytest.raises(RequestError, match="multiple of 4"):  # input image size + margins
        engine.run(
            GenerationRequest(PROMPT, model=str(dev), steps=1, image=gradient_image(30, 32))
        )


def test_progress_events_with_unpacked_previews(engine, dev):
    events = []
    result = engine.run(
        GenerationRequest(PROMPT, model=str(dev), width=SIZE, height=24, steps=3, seed=1),
        progress=events.append,
        preview_every=2,
    )
    assert [(e.step, e.total) for e in events] == [(1, 3), (2, 3), (3, 3)]
    assert events[0].preview is None
    assert events[1].preview is not None and events[1].preview.size == (SIZE, 24)
    # The last preview decodes the final (unpacked, unscaled, unshifted) latents: the image.
    assert_same_image(events[2].preview, result.images[0])
    # img2img reports the steps it actually runs (strength x steps)
    events.clear()
    engine.run(
        GenerationRequest(
            PROMPT, model=str(dev), steps=4, seed=1, image=gradient_image(SIZE, SIZE), strength=0.5
        ),
        progress=events.append,
    )
    assert [(e.step, e.total) for e in events] == [(1, 2), (2, 2)]


def make_flux_lora(base, out, seed: int):
    """A random LoRA on the tiny transformer's attention, saved in diffusers' Flux layout."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer")
    torch.manual_seed(seed)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                   target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with torch.no_grad():  # gaussian init leaves B at zero; make the LoRA do something
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        out, transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True
    )
    return out / "pytorch_lora_weights.safetensors"


def test_lora_changes_output_and_unloads(engine, dev, tmp_path):
    lora = make_flux_lora(dev, tmp_path / "lora", seed=1)

    def run(*loras: LoraSpec) -> Image.Image:
        request = GenerationRequest(
            PROMPT, model=str(dev), width=SIZE, height=SIZE, steps=STEPS, seed=3, loras=loras
        )
        return engine.run(request).images[0]

    plain = run()
    assert max_abs_diff(plain, run(LoraSpec(str(lora), 1.0))) > 10
    assert max_abs_diff(run(), plain) == 0  # unloaded after the run


def test_unknown_transformer_layout_is_refused(tmp_path, dev):
    odd = tmp_path / "flux-odd"
    shutil.copytree(dev, odd)
    config_path = odd / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 32  # a control-style transformer: neither base nor Fill
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="in_channels=32 matches neither"):
        Engine(device="cpu").load(str(odd))

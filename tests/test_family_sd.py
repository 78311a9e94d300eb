"""Stable Diffusion 1.x/2.x: detection, parity with diffusers, properties, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_same_image, center_mask, gradient_image, max_abs_diff, unmasked_diff
from toile.engine.engine import Engine
from toile.errors import RequestError, UnsupportedModeError
from toile.request import GenerationRequest, Outpaint

STEPS = 3


@pytest.fixture(scope="module")
def sd_path(tiny_models):
    return tiny_models("sd")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu")


def diffusers_pipe(cls, path):
    pipe = cls.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_detected_and_defaults(engine, sd_path):
    cached = engine.load(str(sd_path))
    assert cached.family.name == "sd"
    defaults = cached.loaded.defaults
    assert (defaults.width, defaults.height, defaults.steps, defaults.guidance) == (32, 32, 50, 7.5)


def test_txt2img_parity(engine, sd_path):
    from diffusers import StableDiffusionPipeline

    ours = engine.run(GenerationRequest("a red cat", model=str(sd_path), steps=STEPS, seed=7))
    pipe = diffusers_pipe(StableDiffusionPipeline, sd_path)
    ref = pipe(
        "a red cat", num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(7)
    ).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.family, record.mode, record.seed, record.steps) == ("sd", "txt2img", 7, STEPS)


def test_img2img_parity(engine, sd_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    init = gradient_image(32, 32)
    ours = engine.run(
        GenerationRequest(
            "a blue dog", model=str(sd_path), steps=STEPS, seed=3, image=init, strength=0.7
        )
    )
    pipe = diffusers_pipe(StableDiffusionImg2ImgPipeline, sd_path)
    ref = pipe(
        "a blue dog",
        image=init,
        strength=0.7,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert_same_image(ours.images[0], ref)
    assert ours.records[0].mode == "img2img" and ours.records[0].strength == 0.7


def test_inpaint_parity_and_keeps_unmasked(engine, sd_path):
    from diffusers import StableDiffusionInpaintPipeline

    init, mask = gradient_image(32, 32), center_mask(32, 32)
    ours = engine.run(
        GenerationRequest("a cat", model=str(sd_path), steps=STEPS, seed=5, image=init, mask=mask)
    )
    pipe = diffusers_pipe(StableDiffusionInpaintPipeline, sd_path)
    ref = pipe(
        "a cat",
        image=init,
        mask_image=mask,
        num_inference_steps=STEPS,
        height=32,
        width=32,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    # toile keeps unmasked pixels exactly (mask overlay) and matches diffusers inside the mask.
    assert_same_image(ours.images[0], Image.composite(ref, init, mask))
    assert unmasked_diff(ours.images[0], init, mask) == 0.0


def test_same_seed_same_image_and_batch_equals_singles(engine, sd_path):
    batch = engine.run(
        GenerationRequest("a cat", model=str(sd_path), steps=STEPS, seed=11, num_images=2)
    )
    assert [r.seed for r in batch.records] == [11, 12]
    for image, record in zip(batch.images, batch.records, strict=True):
        single = engine.run(
            GenerationRequest("a cat", model=str(sd_path), steps=STEPS, seed=record.seed)
        )
        assert_same_image(image, single.images[0])
    again = engine.run(GenerationRequest("a cat", model=str(sd_path), steps=STEPS, seed=11))
    assert max_abs_diff(again.images[0], batch.images[0]) <= 2
    assert max_abs_diff(batch.images[0], batch.images[1]) > 2  # different seeds differ


def test_outpaint_keeps_original_exactly(engine, sd_path):
    init = gradient_image(16, 24)
    result = engine.run(
        GenerationRequest(
            "a cat",
            model=str(sd_path),
            steps=STEPS,
            seed=1,
            image=init,
            outpaint=Outpaint(left=8, top=0, right=8, bottom=8),
        )
    )
    out = result.images[0]
    assert out.size == (32, 32)
    kept = np.asarray(out)[0:24, 8:24]
    assert np.array_equal(kept, np.asarray(init))
    assert result.records[0].mode == "outpaint"
    assert result.records[0].outpaint == (8, 0, 8, 8)


def test_progress_events(engine, sd_path):
    events = []
    engine.run(
        GenerationRequest("a cat", model=str(sd_path), steps=STEPS, seed=1),
        progress=events.append,
        preview_every=2,
    )
    assert [e.step for e in events] == [1, 2, 3]
    assert all(e.total == STEPS for e in events)
    assert events[1].preview is not None and events[1].preview.size == (32, 32)


def test_cancel_stops_within_one_step(engine, sd_path):
    import threading

    from toile.errors import CancelledError

    cancel = threading.Event()
    steps_seen = []

    def progress(event):
        steps_seen.append(event.step)
        cancel.set()

    with pytest.raises(CancelledError):
        engine.run(
            GenerationRequest("a cat", model=str(sd_path), steps=10, seed=1),
            progress=progress,
            cancel=cancel,
        )
    assert steps_seen == [1]


def test_size_errors(engine, sd_path):
    with pytest.raises(RequestError, match="width: 37 must be a multiple of 2"):
        engine.run(GenerationRequest("x", model=str(sd_path), width=37, steps=1))
    with pytest.raises(RequestError, match="pixels exceeds the budget"):
        engine.run(GenerationRequest("x", model=str(sd_path), width=8192, height=8192, steps=1))


def test_inpainting_checkpoint_refuses_txt2img(tmp_path):
    from fixtures.models import make_sd

    path = make_sd(tmp_path / "sd-inpaint", in_channels=9)
    engine = Engine(device="cpu")
    with pytest.raises(UnsupportedModeError, match="txt2img is not supported"):
        engine.run(GenerationRequest("x", model=str(path), steps=1))
    init, mask = gradient_image(32, 32), center_mask(32, 32)
    result = engine.run(
        GenerationRequest("x", model=str(path), steps=2, seed=0, image=init, mask=mask)
    )
    assert result.images[0].size == (32, 32)


def test_nan_state_fails_with_reason(sd_path, monkeypatch):
    from toile.errors import NumericalError

    engine = Engine(device="cpu")
    unet = engine.load(str(sd_path)).loaded.pipelines["txt2img"].unet
    original = unet.forward

    def broken(*args, **kwargs):
        out = original(*args, **kwargs)
        out[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(unet, "forward", broken)
    with pytest.raises(NumericalError, match="became NaN/inf at step 1 of 3"):
        engine.run(GenerationRequest("a cat", model=str(sd_path), steps=STEPS, seed=1))
    monkeypatch.undo()
    assert engine.run(GenerationRequest("a cat", model=str(sd_path), steps=1)).images


# --- single file (CompVis layout) -------------------------------------------------------------


def test_single_file_matches_the_diffusers_folder(engine, tiny_models, sd_path):
    """The CompVis-layout file holds the tiny folder's weights (both builders are seeded), so
    toile's single-file load must give diffusers' folder output, in txt2img and img2img."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    single = tiny_models("sd_single_file")
    cached = engine.load(str(single))
    assert cached.family.name == "sd" and cached.loaded.variant == ""
    assert (cached.loaded.defaults.width, cached.loaded.defaults.height) == (32, 32)
    ours = engine.run(GenerationRequest("a red cat", model=str(single), steps=STEPS, seed=7))
    ref = diffusers_pipe(StableDiffusionPipeline, sd_path)(
        "a red cat", num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(7)
    ).images[0]
    assert_same_image(ours.images[0], ref)
    assert ours.records[0].family == "sd"
    init = gradient_image(32, 32)
    ours = engine.run(GenerationRequest("a red cat", model=str(single), steps=STEPS, seed=3,
                                        image=init, strength=0.7))
    ref = diffusers_pipe(StableDiffusionImg2ImgPipeline, sd_path)(
        "a red cat", image=init, strength=0.7, num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert_same_image(ours.images[0], ref)


def test_single_file_without_configs_names_the_folder(tmp_path, tiny_models):
    from toile.errors import ModelFormatError

    lonely = tmp_path / "v1-5-pruned.safetensors"
    shutil.copy(tiny_models("sd_single_file"), lonely)
    with pytest.raises(ModelFormatError, match=r"SD 1\.x/2\.x single-file.*v1-5-pruned/"):
        Engine(device="cpu").load(str(lonely))


def test_single_file_of_another_layout_is_not_sd(tmp_path):
    """A file with only a denoiser (no text encoder) is no SD checkpoint: the error says what
    the file holds instead of failing inside diffusers."""
    from safetensors.torch import save_file

    from toile.errors import ModelFormatError

    partial = tmp_path / "unet-only.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)},
              str(partial))
    with pytest.raises(ModelFormatError, match="cannot tell which model family"):
        Engine(device="cpu").load(str(partial))

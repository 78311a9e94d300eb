"""Shared pieces of the fine-tuning tests: tiny image sets, a tiny toile model, and the three
checks every family passes (loss goes down, the LoRA loads back through the engine and changes
the output, ``--resume`` continues exactly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from helpers import max_abs_diff

PROMPT = "a sks square"


def make_images(folder: Path, n: int = 4, size: int = 40, *, captions: bool = False) -> Path:
    """``n`` images: a coloured field with a white square (a pattern a LoRA can learn)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = np.zeros((size, size, 3), np.uint8)
        pixels[:] = rng.integers(0, 255, 3)
        lo, hi = size // 4, 3 * size // 4
        pixels[lo:hi, lo:hi] = 255
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"{PROMPT} number {i}\n")
    return folder


def make_tiny_toile(folder: Path, text_folder: Path) -> Path:
    """A tiny toile model (16x16) whose output conv is random, not zero.

    A freshly built toile U-Net starts with a zero output conv (it predicts v = 0), which
    blocks every gradient upstream of it: LoRA on the attention layers could not learn.
    A trained model has a non-zero one; this stands in for it.
    """
    import torch

    from toile.families.toile.pipeline import ToilePipeline
    from toile.families.toile.testing import tiny_model_config

    if (folder / "model_index.json").is_file():
        return folder
    pipe = ToilePipeline.from_config(tiny_model_config(text_folder), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        pipe.unet.conv_out.weight.normal_(0.0, 0.05)
    pipe.save_pretrained(folder)
    return folder


def config(model: Path, images: Path, out: Path, **changes):
    from toile.train.finetune.config import FinetuneConfig

    values = {
        "images": str(images), "out": str(out), "model": str(model), "prompt": PROMPT,
        "steps": 30, "lr": 1e-2, "batch_size": 4, "progress_bar": False,
    } | changes
    return FinetuneConfig(**values)


def train(model: Path, images: Path, out: Path, **changes):
    from toile.train.finetune.runner import FinetuneRunner

    return FinetuneRunner(config(model, images, out, **changes), command="test",
                          echo=lambda _m: None).run()


def check_loss_goes_down(model: Path, images: Path, out: Path, **changes) -> None:
    result = train(model, images, out, **changes)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < first, f"loss did not go down: first 5 {first:.4f}, last 5 {last:.4f}"
    assert out.is_file()


def check_lora_changes_output(model: Path, lora: Path, size: int | None = None) -> None:
    """The LoRA file goes through the engine (``--lora``) and changes the image; without it
    the model gives the base image again (the adapter was unloaded)."""
    from toile.engine.engine import Engine
    from toile.request import GenerationRequest, LoraSpec

    engine = Engine(device="cpu")
    fields = {"model": str(model), "steps": 2, "seed": 1, "width": size, "height": size}
    plain = engine.run(GenerationRequest(PROMPT, **fields)).images[0]
    tuned = engine.run(GenerationRequest(PROMPT, loras=(LoraSpec(str(lora)),), **fields))
    assert max_abs_diff(plain, tuned.images[0]) > 0, "the LoRA did not change the output"
    assert tuned.records[0].loras[0]["name"] == lora.stem
    again = engine.run(GenerationRequest(PROMPT, **fields)).images[0]
    assert max_abs_diff(plain, again) == 0, "the LoRA was not unloaded after the run"


def check_resume_is_exact(model: Path, images: Path, root: Path, **changes) -> None:
    """4 straight steps == 2 steps + ``--resume`` 2 more (bit for bit)."""
    from safetensors.torch import load_file

    changes = {"lr": 1e-2, "batch_size": 2} | changes
    straight = root / "straight.safetensors"
    train(model, images, straight, steps=4, **changes)
    split = root / "split.safetensors"
    train(model, images, split, steps=2, **changes)
    resumed = train(model, images, split, steps=4, resume=True, **changes)
    assert resumed.steps == 4 and len(resumed.losses) == 2
    a, b = load_file(str(straight)), load_file(str(split))
    assert a.keys() == b.keys() and a
    for key in a:
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key

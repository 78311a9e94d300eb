"""Fine-tuning each diffusers family on its tiny random model: the loss goes down, the LoRA file
loads back through the engine and changes the output, and ``--resume`` is exact.

Family-specific cases (v-prediction, full fine-tuning, text encoders) live in
``test_finetune_<family>.py``; toile's own model in ``test_finetune_toile.py``.
"""

from __future__ import annotations

import pytest

from finetune_common import (
    check_lora_changes_output,
    check_loss_goes_down,
    check_resume_is_exact,
    make_images,
)

# Tiny model -> training resolution (None: the model's default). FLUX.1's tiny model defaults
# to 256 (the real model's 128 x its VAE scale); 32 keeps it quick.
FAMILIES = {"sd": None, "sdxl": None, "sd3": None, "flux_dev": 32}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request, tiny_models, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"ft-{name}")
    return tiny_models(name), make_images(root / "images"), root, FAMILIES[name]


def test_loss_goes_down_and_lora_loads_back(setup):
    """... and a validation prompt is drawn at the end by the family's own pipeline."""
    from PIL import Image

    from toile.io.images import LABEL_WIDTH

    model, images, root, size = setup
    lora = root / "lora.safetensors"
    sized = {"resolution": size} if size else {}
    check_loss_goes_down(model, images, lora, validation_prompts=("a photo",), **sized)
    check_lora_changes_output(model, lora, size=size)
    grid = Image.open(root / "lora.safetensors.checkpoints" / "samples" / "step-000030.png")
    # one labelled row: the prompt's strip, then the image at the training resolution
    assert grid.width == LABEL_WIDTH + grid.height and (size is None or grid.height == size)


def test_resume_is_exact(setup):
    model, images, root, size = setup
    check_resume_is_exact(model, images, root / "resume", **({"resolution": size} if size else {}))

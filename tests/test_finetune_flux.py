"""Fine-tuning FLUX.1-dev (tiny random model): loss goes down, the LoRA loads back, exact resume.

The tiny model's default size is 256 (the real model's 128 x its VAE scale); 32 keeps it quick.
"""

from __future__ import annotations

import pytest

from finetune_common import (
    check_lora_changes_output,
    check_loss_goes_down,
    check_resume_is_exact,
    make_images,
)

SIZE = 32


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-flux")
    return tiny_models("flux_dev"), make_images(root / "images"), root


def test_loss_goes_down_and_lora_loads_back(setup):
    model, images, root = setup
    lora = root / "lora.safetensors"
    check_loss_goes_down(model, images, lora, resolution=SIZE)
    check_lora_changes_output(model, lora, size=SIZE)


def test_resume_is_exact(setup):
    model, images, root = setup
    check_resume_is_exact(model, images, root / "resume", resolution=SIZE)

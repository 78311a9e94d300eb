"""Fine-tuning SDXL (tiny random model): loss goes down, the LoRA loads back, exact resume."""

from __future__ import annotations

import pytest

from finetune_common import (
    check_lora_changes_output,
    check_loss_goes_down,
    check_resume_is_exact,
    make_images,
)


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-sdxl")
    return tiny_models("sdxl"), make_images(root / "images"), root


def test_loss_goes_down_and_lora_loads_back(setup):
    model, images, root = setup
    lora = root / "lora.safetensors"
    check_loss_goes_down(model, images, lora)
    check_lora_changes_output(model, lora)


def test_resume_is_exact(setup):
    model, images, root = setup
    check_resume_is_exact(model, images, root / "resume")


def test_resume_is_exact_with_both_text_encoders_trained(setup):
    model, images, root = setup
    check_resume_is_exact(model, images, root / "resume-te", train_text_encoder=True)

"""Fine-tuning SDXL (tiny random model) with both text encoders trained: exact resume.

The cases every family shares are in ``test_finetune_families.py``."""

from __future__ import annotations

import pytest

from finetune_common import check_resume_is_exact, make_images


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-sdxl")
    return tiny_models("sdxl"), make_images(root / "images"), root


def test_resume_is_exact_with_both_text_encoders_trained(setup):
    model, images, root = setup
    check_resume_is_exact(model, images, root / "resume-te", train_text_encoder=True)

"""Output checks: diffusers' Stable Diffusion safety checker (tiny, random, its thresholds set
so it always or never flags) run by the engine on every image, with each flag action."""

from __future__ import annotations

import pytest

from helpers import max_abs_diff
from toile.engine.engine import Engine
from toile.request import GenerationRequest
from toile.safety.output_check import OutputWithheldError, SDSafetyChecker, load_output_check

PROMPT = "a red circle on a blue background"


def make_checker(folder, *, flag: bool):
    """A tiny StableDiffusionSafetyChecker saved as diffusers' SD folders hold it."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                     "num_hidden_layers": 1, "vocab_size": 100},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                       "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    model = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # cosine similarity is in [-1, 1]: thresholds of -2 / 2 decide
        model.concept_embeds_weights.fill_(-2.0 if flag else 2.0)
        model.special_care_embeds_weights.fill_(2.0)
    model.save_pretrained(folder / "safety_checker", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).\
        save_pretrained(folder / "feature_extractor")
    return folder


@pytest.fixture(scope="module")
def checkers(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkers")
    return {flag: make_checker(root / str(flag), flag=flag) for flag in (True, False)}


def run(check, action):
    engine = Engine(device="cpu", output_check=check, on_flag=action)
    return engine.run(GenerationRequest(PROMPT, seed=2, steps=3, num_images=2))


def test_the_checker_matches_diffusers_own_call(checkers):
    """The verdict is what diffusers' pipelines compute (feature extractor -> checker)."""
    import numpy as np
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from PIL import Image
    from transformers import CLIPImageProcessor

    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    for flag, folder in checkers.items():
        model = StableDiffusionSafetyChecker.from_pretrained(str(folder / "safety_checker"))
        processor = CLIPImageProcessor.from_pretrained(str(folder / "feature_extractor"))
        clip_input = processor(images, return_tensors="pt").pixel_values
        _, expected = model(images=[np.asarray(i) / 255.0 for i in images], clip_input=clip_input)
        ours = SDSafetyChecker(folder).check(images)
        assert [v.flagged for v in ours] == list(expected) == [flag, flag]


def test_each_action_on_flagged_and_clean_images(checkers):
    plain = run(None, "withhold")
    assert "output" not in plain.records[0].safety  # no check configured
    clean = run(SDSafetyChecker(checkers[False]), "withhold")
    assert max_abs_diff(clean.images[0], plain.images[0]) == 0
    assert clean.records[0].safety["output"] == {
        "checker": "sd-safety-checker", "flagged": False, "action": "none"}
    with pytest.raises(OutputWithheldError, match="image 0 was withheld"):
        run(SDSafetyChecker(checkers[True]), "withhold")
    blurred = run(SDSafetyChecker(checkers[True]), "blur")
    assert max_abs_diff(blurred.images[0], plain.images[0]) > 0
    assert blurred.records[1].safety["output"]["action"] == "blur"
    flagged = run(load_output_check(str(checkers[True])), "flag")
    assert max_abs_diff(flagged.images[0], plain.images[0]) == 0
    assert flagged.records[0].safety["output"] == {
        "checker": "sd-safety-checker", "flagged": True, "action": "flag"}


def test_the_server_fails_a_withheld_job_with_the_reason(checkers, tmp_path, tiny_models):
    from serve_helpers import serve, wait_job
    from toile.engine.engine import Engine as ServerEngine
    from toile.engine.models import ModelRegistry

    engine = ServerEngine(ModelRegistry(tmp_path / "models.json"), device="cpu",
                          allow_paths=False, output_check=SDSafetyChecker(checkers[True]))
    with serve(engine, tmp_path / "data") as client:
        job_id = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 2}).json()["id"]
        job = wait_job(client, job_id)
        assert job["status"] == "failed" and "withheld" in job["error"]["message"]
        assert job["images"] == []


def test_a_bad_checker_spec_is_one_line(tmp_path):
    from toile.errors import ToileError

    with pytest.raises(ToileError, match="give a safety-checker folder or module:callable"):
        load_output_check("no-such-thing")
    with pytest.raises(ToileError, match="cannot be imported"):
        load_output_check("no_such_module:factory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToileError, match="cannot load a Stable Diffusion safety checker"):
        load_output_check(str(tmp_path / "empty"))

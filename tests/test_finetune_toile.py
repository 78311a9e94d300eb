"""Fine-tuning toile's own model (tiny random one): loss goes down, the LoRA loads back through
the toile family, exact resume, and full fine-tuning saves a folder ``--model`` loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_common import (
    PROMPT,
    check_lora_changes_output,
    check_loss_goes_down,
    check_resume_is_exact,
    make_images,
    make_tiny_toile,
    train,
)
from helpers import max_abs_diff


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from toile.families.toile.testing import tiny_text_encoder

    root = tmp_path_factory.mktemp("ft-toile")
    text = tiny_text_encoder(root / "text")
    return make_tiny_toile(root / "model", text), make_images(root / "images", size=24), root


def test_loss_goes_down_and_lora_loads_back(setup):
    model, images, root = setup
    lora = root / "lora.safetensors"
    check_loss_goes_down(model, images, lora)
    check_lora_changes_output(model, lora)


def test_resume_is_exact(setup):
    model, images, root = setup
    check_resume_is_exact(model, images, root / "resume")


def test_lora_layers_choose_where_the_adapters_go(setup):
    """``--lora-layers attn2.to_k,attn2.to_v`` (Custom Diffusion's choice): only the
    cross-attention keys and values get adapters; the file says so, loads back, changes the
    output, and resumes exactly (the layer list survives the saved config)."""
    import argparse

    from safetensors import safe_open

    from toile.cli.finetune_cmd import add_arguments, config_from_args
    from toile.io.lora_info import read_lora_info

    model, images, root = setup
    layers = ("attn2.to_k", "attn2.to_v")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--images", "x", "--out", "y.safetensors",
                              "--lora-layers", "attn2.to_k, attn2.to_v"])
    assert config_from_args(args).lora_layers == layers
    lora = root / "cross.safetensors"
    train(model, images, lora, steps=3, lora_layers=layers)
    with safe_open(str(lora), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in keys), keys
    assert read_lora_info(lora)["lora_layers"] == list(layers)
    check_lora_changes_output(model, lora)
    check_resume_is_exact(model, images, root / "cross-resume", lora_layers=layers)


def test_unknown_lora_layers_are_refused_by_name(setup):
    from toile.errors import RequestError

    model, images, root = setup
    with pytest.raises(RequestError, match=r"lora_layers: .*\['attn9.to_k'\].*to_q"):
        train(model, images, root / "bad.safetensors", steps=1,
              lora_layers=("attn2.to_k", "attn9.to_k"))
    with pytest.raises(RequestError, match="lora_layers: must be a non-empty list"):
        train(model, images, root / "bad.safetensors", steps=1, lora_layers=())
    with pytest.raises(RequestError, match="lora_layers: only applies to --method lora"):
        train(model, images, root / "bad", steps=1, method="full", lora_layers=("to_q",))


def test_distilled_prior_starts_at_zero_and_resumes_exactly(setup):
    """``--prior-loss distill``: class samples regress on the base model's own prediction
    (adapters off), so at step 0 (LoRA B = 0) the prior term is exactly 0 and the loss is
    the instance loss alone; with class images as targets it is not. Resume stays exact."""
    model, images, root = setup
    classes = make_images(root / "distill-classes", n=3, size=24, captions=True)
    common = {"prior_preservation": True, "class_data": str(classes), "batch_size": 2,
              "lr": 1e-2}
    plain = train(model, images, root / "plain.safetensors", steps=2, batch_size=2, lr=1e-2)
    distilled = train(model, images, root / "distill.safetensors", steps=2,
                      prior_loss="distill", **common)
    imaged = train(model, images, root / "imaged.safetensors", steps=2, **common)
    assert distilled.losses[0] == pytest.approx(plain.losses[0], rel=1e-5, abs=1e-7)
    assert imaged.losses[0] > plain.losses[0] + 1e-3  # the class images' own error
    assert distilled.losses[1] != pytest.approx(plain.losses[1], rel=1e-6)  # the term is live
    check_resume_is_exact(model, images, root / "distill-resume", prior_loss="distill",
                          **common)


def test_gradient_accumulation_and_checkpointing_train_the_same_steps(setup):
    """Two micro-batches of 2 make the same optimizer step as one batch of 4 (same samples,
    same draws, gradients summed), with the distilled prior's class half too; gradient
    checkpointing (recompute in the backward pass) changes memory, not the result."""
    from safetensors.torch import load_file

    from finetune_common import config
    from toile.train.finetune.runner import FinetuneRunner

    model, images, root = setup
    classes = make_images(root / "accum-classes", n=4, size=24, captions=True)
    common = {"prior_preservation": True, "class_data": str(classes), "prior_loss": "distill",
              "steps": 3}
    whole = train(model, images, root / "whole.safetensors", batch_size=4, **common)
    split = train(model, images, root / "split.safetensors", batch_size=2,
                  gradient_accumulation_steps=2, **common)
    runner = FinetuneRunner(config(model, images, root / "recompute.safetensors", batch_size=4,
                                   gradient_checkpointing=True, **common),
                            command="test", echo=lambda _m: None)
    assert runner.objective.denoiser.is_gradient_checkpointing
    recomputed = runner.run()
    reference = load_file(str(root / "whole.safetensors"))
    moved = max(float(v.abs().max()) for k, v in reference.items() if "lora_B" in k)
    assert moved > 1e-3  # the adapters trained, so the comparisons below are not vacuous
    for name, result, tolerance in (("split", split, 1e-5), ("recompute", recomputed, 1e-6)):
        other = load_file(str(root / f"{name}.safetensors"))
        assert other.keys() == reference.keys()
        worst = max(float((other[k] - reference[k]).abs().max()) for k in reference)
        assert worst <= tolerance, f"{name}: max difference {worst:.2e}"
        assert result.losses == pytest.approx(whole.losses, rel=1e-5)


def test_validation_grids_show_training_without_changing_it(setup):
    """``--validation-prompt`` twice with ``--validation-every 2`` over 3 steps: grids at
    steps 2 and 3 (the end), one image per prompt, different as the LoRA trains; the trained
    weights and losses are exactly those of the run without samples."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from toile.io.images import LABEL_WIDTH

    model, images, root = setup
    common = {"steps": 3, "batch_size": 2}
    plain = train(model, images, root / "quiet.safetensors", **common)
    sampled = train(model, images, root / "sampled.safetensors",
                    validation_prompts=(PROMPT, "a red field"), validation_every=2, **common)
    samples = root / "sampled.safetensors.checkpoints" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-000002.png", "step-000003.png"]
    early, late = (Image.open(samples / f"step-00000{n}.png").convert("RGB") for n in (2, 3))
    # one row per prompt: the prompt written in a strip on the left, then its image
    side = early.width - LABEL_WIDTH
    assert early.height == 2 * max(side, 24)
    rows = [np.asarray(early)[r * early.height // 2 : (r + 1) * early.height // 2] for r in (0, 1)]
    labels = [row[:, :LABEL_WIDTH].min(axis=2) for row in rows]
    assert all((label < 128).sum() > 20 for label in labels)  # text drawn in each strip
    assert not np.array_equal(labels[0], labels[1])  # ... and they say different prompts
    assert max_abs_diff(early, late) > 0
    assert sampled.losses == plain.losses
    quiet, loud = (load_file(str(root / f"{n}.safetensors")) for n in ("quiet", "sampled"))
    assert all(quiet[k].equal(loud[k]) for k in quiet)


def test_validation_settings_are_checked():
    from toile.errors import RequestError
    from toile.train.finetune.config import FinetuneConfig

    for bad in ({"validation_every": 5}, {"validation_prompts": ("",)},
                {"validation_prompts": ("x",), "validation_every": -1}):
        with pytest.raises(RequestError) as info:
            FinetuneConfig(images="x", out="y.safetensors", **bad)
        assert info.value.field in ("validation_prompts", "validation_every")


def test_gradient_accumulation_must_be_a_positive_integer():
    from toile.errors import RequestError
    from toile.train.finetune.config import FinetuneConfig

    for bad in (0, -1, 1.5):
        with pytest.raises(RequestError) as info:
            FinetuneConfig(images="x", out="y.safetensors", gradient_accumulation_steps=bad)
        assert info.value.field == "gradient_accumulation_steps"


def test_checkpoints_older_than_a_setting_resume_with_its_default():
    from toile.train.finetune.config import FinetuneConfig

    config = FinetuneConfig(images="x", out="y.safetensors")
    saved = json.loads(json.dumps(config.to_dict()))
    del saved["prior_loss"], saved["lora_layers"]  # a checkpoint from before they existed
    assert config.resume_mismatches(saved) == []
    changed = config.with_changes(prior_loss="distill", prior_preservation=True,
                                  class_prompt="a star")
    assert changed.resume_mismatches(saved) == ["prior_preservation", "class_prompt",
                                                "prior_loss"]


def test_distilled_prior_needs_a_lora_and_class_images(setup):
    from toile.errors import RequestError

    model, images, root = setup
    with pytest.raises(RequestError, match="prior_loss: distill needs prior preservation"):
        train(model, images, root / "x.safetensors", steps=1, prior_loss="distill")
    with pytest.raises(RequestError, match="prior_loss: must be one of images, distill"):
        train(model, images, root / "x.safetensors", steps=1, prior_loss="teacher")


def test_full_finetune_saves_a_loadable_model(setup):
    from toile.engine.engine import Engine
    from toile.request import GenerationRequest

    model, images, root = setup
    out = root / "full"
    result = train(model, images, out, method="full", steps=3, lr=1e-3)
    assert result.steps == 3 and (out / "model_index.json").is_file()
    assert (out / "finetune.json").is_file()
    engine = Engine(device="cpu")
    fields = {"steps": 2, "seed": 0}
    base = engine.run(GenerationRequest(PROMPT, model=str(model), **fields)).images[0]
    tuned = engine.run(GenerationRequest(PROMPT, model=str(out), **fields)).images[0]
    assert max_abs_diff(base, tuned) > 0


def test_text_encoder_training_is_refused_with_a_reason(setup):
    from toile.errors import RequestError

    model, images, root = setup
    with pytest.raises(RequestError, match="train_text_encoder: .*frozen sentence encoder"):
        train(model, images, root / "te.safetensors", train_text_encoder=True, steps=1)


def test_foreign_lora_files_are_refused_and_the_engine_goes_on(setup, tmp_path):
    import torch
    from safetensors.torch import save_file

    from toile.engine.engine import Engine
    from toile.errors import RequestError
    from toile.request import GenerationRequest, LoraSpec

    model, _images, _root = setup
    for_sd = tmp_path / "sd.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(for_sd),
              metadata={"toile.family": '"sd"'})
    for_flux = tmp_path / "flux.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(for_flux))
    engine = Engine(device="cpu")
    fields = {"model": str(model), "steps": 1, "seed": 0}
    with pytest.raises(RequestError, match="loras: .* trained for the sd family"):
        engine.run(GenerationRequest(PROMPT, loras=(LoraSpec(str(for_sd)),), **fields))
    with pytest.raises(RequestError, match="loras: .* holds no toile U-Net weights"):
        engine.run(GenerationRequest(PROMPT, loras=(LoraSpec(str(for_flux)),), **fields))
    assert engine.run(GenerationRequest(PROMPT, **fields)).images


def test_paired_change_counts_flips_and_their_noise():
    from toile.train.finetune.demo import paired_change

    base = [True, True, False, False, True, False, True, True]
    tuned = [True, False, True, True, True, False, True, True]
    assert paired_change(base, tuned) == {"lost": 1, "gained": 2, "change": 0.125,
                                          "stderr": round(3 ** 0.5 / 8, 4)}
    assert paired_change(base, base)["stderr"] == 0.0
    with pytest.raises(ValueError):
        paired_change(base, tuned[:3])


def test_demonstration_runs_end_to_end_and_reuses_its_stages(setup, tmp_path, capsys):
    """``python -m toile.train.finetune.demo`` on a tiny model: the five captioned images, the
    base model's class images (captioned with their prompts), the fine-tune and the four
    evaluations as real ``toile`` commands, a summary with every number; a second run reuses
    every stage."""
    import json

    from toile.train.finetune import demo

    model, _images, _root = setup
    out = tmp_path / "demo"
    args = ["--out", str(out), "--model", str(model), "--steps", "2", "--n", "2",
            "--class-images", "3", "--probe", "0", "--threads", "1"]
    assert demo.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["images"]) == 5 and summary["class_data"]["images"] == 3
    captions = sorted(p.read_text() for p in (out / "class-data").glob("class-*.txt"))
    assert len(captions) == 3 and all(c.strip() for c in captions)
    assert summary["finetune"]["steps"] == 2 and (out / "pink-star.safetensors").is_file()
    assert (Path(summary["finetune"]["samples"]) / "step-000002.png").is_file()
    assert "--class-data" in summary["commands"]["finetune"]
    for name in ("held_out_base", "held_out_finetuned", "original_base", "original_finetuned"):
        assert summary[name]["total"] == 2 and 0.0 <= summary[name]["accuracy"] <= 1.0
    assert summary["original_change"] == round(
        summary["original_finetuned"]["accuracy"] - summary["original_base"]["accuracy"], 4)
    paired = summary["original_paired"]
    assert paired["change"] == summary["original_change"]
    assert paired["lost"] + paired["gained"] <= 2
    capsys.readouterr()
    assert demo.main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert set(again["reused_stages"]) == {
        "class_data", "finetune", "held_out_base", "held_out_finetuned", "original_base",
        "original_finetuned"}

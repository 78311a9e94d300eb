"""toile's cascade: the SR stage as a model (upscale task), the plan chosen for each size,
and toile-mini's default 256² through it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_common import make_tiny_toile
from toile.data.scenes import render, sample_scene
from toile.engine.engine import Engine
from toile.engine.models import ModelRegistry
from toile.engine.plan import StageRole, plan_for
from toile.errors import RequestError
from toile.families.toile.config import TextEncoderConfig
from toile.families.toile.sr_net import SRNet, SRNetConfig
from toile.request import GenerationRequest, Mode
from toile.resolve import Cascade, FamilyDefaults, resolve
from toile.train.sr_train import SRTrainConfig, make_batch, write_sr_folder

CASCADE = Cascade(upscaler="sr", factor=4, native=64, default_side=256, max_pixels=1024 ** 2)
DEFAULTS = FamilyDefaults(modes=frozenset({Mode.TXT2IMG, Mode.IMG2IMG}), width=256, height=256,
                          steps=2, guidance=1.0, size_multiple=2, max_pixels=256 * 256,
                          cascade=CASCADE)


@pytest.mark.parametrize(("size", "base", "passes"), [
    ((64, 64), (64, 64), 0), ((48, 32), (64, 42), 0), ((256, 256), (64, 64), 1),
    ((128, 128), (64, 64), 1), ((512, 512), (64, 64), 2), ((1024, 1024), (64, 64), 2),
    ((512, 256), (64, 32), 2), ((256, 1024), (16, 64), 2)])
def test_cascade_sizes(size, base, passes):
    assert CASCADE.passes(*size) == passes
    if passes:
        assert CASCADE.base_size(*size, 2) == base


def _plan(**fields):
    resolved = resolve(GenerationRequest("a red circle", **fields), DEFAULTS, "toile")
    return resolved, plan_for(resolved, DEFAULTS)


def test_the_request_size_chooses_the_plan():
    resolved, plan = _plan()
    assert (resolved.width, resolved.height) == (256, 256)
    assert [s.role for s in plan.stages] == [StageRole.BASE, StageRole.UPSCALE]
    assert plan.base_size == (64, 64) and plan.stages[1].model == "sr"
    _, plan = _plan(width=1024, height=512)
    assert [s.role for s in plan.stages] == [StageRole.BASE, *[StageRole.UPSCALE] * 2]
    assert plan.base_size == (64, 32)
    _, plan = _plan(width=64, height=64)
    assert len(plan.stages) == 1 and plan.base_size is None
    # no cascade for tiling or an input image: those run at the model's own size limit
    _, plan = _plan(width=128, height=128, tiling=True)
    assert len(plan.stages) == 1
    with pytest.raises(RequestError) as err:
        _plan(width=512, height=512, tiling=True)
    assert err.value.field == "width"
    with pytest.raises(RequestError) as err:
        _plan(width=2048, height=512)
    assert err.value.field == "width" and "\n" not in str(err.value)


@pytest.fixture
def cascade_engine(tmp_path, text_folder):
    """A tiny toile model whose cascade.json names a tiny random SR stage."""
    model = make_tiny_toile(tmp_path / "base", text_folder)
    (model / "cascade.json").write_text(json.dumps(
        {"upscaler": "tiny-sr", "default_side": 32, "max_side": 256}))
    torch.manual_seed(0)
    net = SRNet(SRNetConfig(channels=8, blocks=1, text_dim=32))
    with torch.no_grad():
        net.tail.weight.normal_(0, 0.05)  # not the bilinear start: the stage must show
    text = TextEncoderConfig(path=str(text_folder), max_tokens=12, dim=32)
    write_sr_folder(net, tmp_path / "sr", {"steps": 0}, text=text)
    registry = ModelRegistry(tmp_path / "models.json")
    registry.add("tiny", model)
    registry.add("tiny-sr", tmp_path / "sr")
    return Engine(registry, policy=None)


def test_cascade_runs_its_stages_and_records_them(cascade_engine):
    result = cascade_engine.run(GenerationRequest("a red circle", model="tiny", seed=4))
    assert result.images[0].size == (32, 32)  # the cascade's default side
    record = result.records[0]
    assert [s["role"] for s in record.stages] == ["base", "upscale"]
    assert record.stages[1]["model_id"] == "tiny-sr"
    again = cascade_engine.run(GenerationRequest("a red circle", model="tiny", seed=4))
    assert again.images[0].tobytes() == result.images[0].tobytes()
    # the base alone at its own size, then the SR stage by hand: the same pixels
    base = cascade_engine.run(GenerationRequest("a red circle", model="tiny", seed=4,
                                                width=16, height=16)).images[0]
    by_hand = cascade_engine.run(GenerationRequest("a red circle", task="upscale", image=base,
                                                   model="tiny-sr", scale=4)).images[0]
    expected = by_hand.resize((32, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    wide = cascade_engine.run(GenerationRequest("a red circle", model="tiny", seed=1,
                                                width=48, height=24))
    assert wide.images[0].size == (48, 24)


def test_sr_stage_is_an_upscaler(cascade_engine):
    image = Image.new("RGB", (10, 6), (200, 30, 30))
    result = cascade_engine.run(GenerationRequest("", task="upscale", image=image,
                                                  model="tiny-sr"))
    assert result.images[0].size == (40, 24)
    record = result.records[0]
    assert (record.family, record.variant, record.task) == ("toile", "sr", "upscale")


def test_sr_batches_are_consistent():
    config = SRTrainConfig(out="unused", batch_size=3, crop=8)
    low, level, high, prompts = make_batch(config, 5)
    again = make_batch(config, 5)
    assert torch.equal(low, again[0]) and prompts == again[3]
    assert low.shape == (3, 3, 8, 8) and high.shape == (3, 3, 32, 32)
    # the clean low-resolution input is the target box-filtered down 4x, plus the noise level
    clean = torch.nn.functional.avg_pool2d(high, 4)
    for i in range(3):
        error = (low[i] - clean[i]).std().item()
        assert error <= level[i].item() * 1.5 + 0.01


def test_shipped_sr_stage_keeps_the_layout_of_true_renders():
    """The built-in toile-sr on renders: the 256² result, box-filtered back to 64², is close to
    the input everywhere (the stage adds detail, never objects)."""
    engine = Engine(policy=None)
    rng = random.Random(0)
    for _ in range(3):
        scene = sample_scene(rng)
        low = render(scene, 64, rng)
        up = engine.run(GenerationRequest("", task="upscale", image=low)).images[0]
        assert up.size == (256, 256)
        back = np.asarray(up.reduce(4), np.float32)
        assert np.abs(back - np.asarray(low, np.float32)).mean() < 6.0

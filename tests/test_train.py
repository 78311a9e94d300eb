"""Training toile's own model: one step, determinism, exact resume, export, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytest.importorskip("toile.data.scenes")

from safetensors.torch import load_file  # noqa: E402

from toile.families.toile.testing import tiny_model_config  # noqa: E402
from toile.train.config import TrainConfig, preset  # noqa: E402
from toile.train.scene_data import make_batch  # noqa: E402
from toile.train.trainer import Trainer, latest_checkpoint, learning_rate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(out: Path, text_folder: Path, **changes) -> TrainConfig:
    changes = {"samples_with_checkpoints": False, **changes}
    return preset("tiny", out_dir=str(out), model=tiny_model_config(text_folder), **changes)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_step_changes_weights_with_finite_loss(tmp_path: Path, text_folder: Path) -> None:
    trainer = Trainer(tiny(tmp_path / "run", text_folder), command="test")
    before = weights(trainer.unwrapped)
    empty = trainer.pipe.encode_prompts([""])
    loss = trainer.train_step(empty)
    assert loss == loss and 0.0 < loss < 100.0  # finite and sane
    after = weights(trainer.unwrapped)
    assert trainer.step == 1
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_batches_are_a_function_of_seed_and_step() -> None:
    a = make_batch(0, 5, 3, image_size=16)
    b = make_batch(0, 5, 3, image_size=16)
    c = make_batch(0, 6, 3, image_size=16)
    assert a.images.shape == (3, 3, 16, 16)
    assert float(a.images.min()) >= -1.0 and float(a.images.max()) <= 1.0
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.captions != c.captions or not torch.equal(a.images, c.images)
    assert make_batch(0, 5, 3, image_size=16, rank=1).captions != a.captions


def test_learning_rate_warmup_then_constant() -> None:
    config = TrainConfig(lr=1e-3, warmup_steps=4)
    assert [learning_rate(s, config) for s in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    )


def test_cooldown_decays_linearly_to_zero_at_the_end() -> None:
    config = preset("tiny", steps=10, warmup_steps=2, cooldown_steps=4)
    rates = [learning_rate(s, config) / config.lr for s in range(10)]
    assert rates == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="cooldown_steps"):
        preset("tiny", steps=10, cooldown_steps=11)


def test_resume_continues_exactly(tmp_path: Path, text_folder: Path) -> None:
    straight = Trainer(tiny(tmp_path / "a", text_folder, steps=4), command="test")
    straight.train()

    first = Trainer(tiny(tmp_path / "b", text_folder, steps=2), command="test")
    first.train()
    assert latest_checkpoint(tmp_path / "b").name == "step-000002"
    resumed = Trainer(tiny(tmp_path / "b", text_folder, steps=4, resume=True), command="test")
    assert resumed.step == 2
    resumed.train()

    for name, value in weights(straight.unwrapped).items():
        assert torch.equal(value, weights(resumed.unwrapped)[name]), name
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    ckpt_a = load_file(str(latest_checkpoint(tmp_path / "a") / "ema.safetensors"))
    ckpt_b = load_file(str(latest_checkpoint(tmp_path / "b") / "ema.safetensors"))
    assert all(torch.equal(ckpt_a[k], ckpt_b[k]) for k in ckpt_a)
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_export_and_reexport(tmp_path: Path, text_folder: Path) -> None:
    from toile.families.toile.family import ToileFamily
    from toile.train.export import main as export_main

    config = tiny(tmp_path / "run", text_folder, steps=2, samples_with_checkpoints=True)
    trainer = Trainer(config, command="test")
    trainer.train()
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()
    out = trainer.export(tmp_path / "model")
    assert ToileFamily().detect(out)
    card = (out / "MODEL_CARD.md").read_text()
    assert "Steps: 2" in card and "test" in card

    assert export_main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "again"),
                        "--eval", "3", "--guidance", "3.5"]) == 0
    assert "Scene checker pass rate" in (tmp_path / "again" / "MODEL_CARD.md").read_text()
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert set(metrics) == {"train", "heldout"} and metrics["heldout"]["prompts"] == 3
    loaded = ToileFamily().load(tmp_path / "again", "cpu", torch.float32)
    assert loaded.defaults.guidance == 3.5
    pipe = loaded.pipelines["txt2img"]
    # Exported weights are float16 on disk; the loaded pipeline runs in the asked dtype.
    assert pipe.dtype == torch.float32
    image = pipe(["a red circle"], seeds=[0], steps=2)[0]
    assert image.size == (16, 16)
    # The export holds the EMA weights (rounded to float16).
    ema = {n: p for n, p in zip([n for n, _ in trainer.unwrapped.named_parameters()],
                                trainer.ema.shadow_params, strict=True)}
    got = dict(pipe.unet.named_parameters())
    for name, value in ema.items():
        assert torch.allclose(got[name], value.half().float())


def test_cli_train_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from toile.cli.train_cmd import main

    assert main(["--preset", "tiny", "--out", str(tmp_path / "cli"), "--steps", "1",
                 "--batch-size", "2", "--no-progress"]) == 0
    assert latest_checkpoint(tmp_path / "cli").name == "step-000001"
    assert main(["--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    # --fsdp in one process: nothing to shard, trains as usual and is recorded.
    assert main(["--preset", "tiny", "--out", str(tmp_path / "fsdp"), "--steps", "1",
                 "--batch-size", "2", "--no-progress", "--fsdp"]) == 0
    assert json.loads((tmp_path / "fsdp" / "train_config.json").read_text())["fsdp"] is True
    assert main(["--preset", "tiny", "--out", str(tmp_path / "x"), "--fsdp",
                 "--mixed-precision", "fp16"]) == 2
    assert "FSDP trains in float32 or bf16" in capsys.readouterr().err


def test_config_round_trip_and_validation(tmp_path: Path) -> None:
    config = preset("toile-mini", steps=10)
    config.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == config
    with pytest.raises(ValueError):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError):
        preset("nope")


def test_snapshots_and_learning_curve(tmp_path: Path, text_folder: Path) -> None:
    from toile.train.curve import CurveSettings, learning_curve, read_curve
    from toile.train.curve import main as curve_main
    from toile.train.export import main as export_main

    run = tmp_path / "run"
    trainer = Trainer(tiny(run, text_folder, steps=4, snapshot_every=2), command="test")
    trainer.train()
    snapshots = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snapshots == ["step-000002", "step-000004"]
    # A snapshot holds exactly the EMA weights of its step (the last one equals the trainer's).
    names = [n for n, _ in trainer.unwrapped.named_parameters()]
    saved = load_file(str(run / "snapshots" / "step-000004" / "ema.safetensors"))
    for name, shadow in zip(names, trainer.ema.shadow_params, strict=True):
        assert torch.equal(saved[name], shadow)
    assert json.loads((run / "snapshots" / "step-000002" / "state.json").read_text())["step"] == 2

    settings = CurveSettings(n=3, steps=2)
    points = learning_curve(run, settings, progress=False)
    assert [p.step for p in points] == [2, 4]
    assert [p.images_seen for p in points] == [2 * 4, 4 * 4]  # tiny preset: batch 4
    assert all(0.0 <= p.accuracy <= 1.0 for p in points)
    assert all(set(p.by_kind) <= {"single", "relation", "count"} for p in points)
    assert all("background" in p.aspects and min(p.aspects.values()) >= 0.0 for p in points)
    assert all(max(p.aspects.values()) <= 1.0 for p in points)
    cache = run / "snapshots" / "step-000002" / settings.cache_name()
    assert cache.is_file()
    # A rerun reads the cached grades and writes the same curve.
    cache_time = cache.stat().st_mtime_ns
    assert learning_curve(run, settings, progress=False) == points
    assert cache.stat().st_mtime_ns == cache_time
    assert read_curve(run) == (settings, points)
    assert [p.step for p in learning_curve(run, settings, every=4, progress=False)] == [4]
    # The newest snapshot is always a point, on the multiples or not.
    assert [p.step for p in learning_curve(run, settings, every=3, progress=False)] == [4]
    assert curve_main(["--run", str(run), "--n", "3", "--steps", "2"]) == 0  # rewrites all
    # The model card of an export from this run shows the curve.
    assert export_main(["--run", str(run), "--out", str(tmp_path / "model")]) == 0
    card = (tmp_path / "model" / "MODEL_CARD.md").read_text()
    assert "## Learning curve" in card and "| 4 | 16 |" in card
    # No snapshots: a clear error, exit status 2.
    assert curve_main(["--run", str(tmp_path / "empty")]) == 2

"""``toile train --data``: training from scratch on an image-caption folder or WebDataset
shards, streamed — bad samples counted, buckets for non-square images, exact resume (the
stream is replayed), sample prompts from the data, clear errors on unusable data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from toile.errors import RequestError  # noqa: E402
from toile.families.toile.testing import tiny_model_config  # noqa: E402
from toile.train.config import TrainConfig, preset  # noqa: E402
from toile.train.trainer import Trainer  # noqa: E402

COLORS = ("red", "green", "blue", "white", "black", "yellow")
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
       "white": (250, 250, 250), "black": (5, 5, 5), "yellow": (240, 230, 20)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def image_bytes(color: str, size: tuple[int, int]) -> bytes:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = RGB[color]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path, n: int = 12) -> Path:
    """``n`` captioned squares in two nested folders, one uncaptioned and one broken file."""
    for i in range(n):
        folder = root / f"part{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        color = COLORS[i % len(COLORS)]
        (folder / f"{i:03d}.png").write_bytes(image_bytes(color, (24, 24)))
        (folder / f"{i:03d}.txt").write_text(f"a {color} field\n")
    (root / "part0" / "nocaption.png").write_bytes(image_bytes("red", (24, 24)))
    (root / "part1" / "broken.png").write_bytes(b"not an image")
    (root / "part1" / "broken.txt").write_text("a broken file\n")
    return root


def make_shards(root: Path, n: int = 12) -> Path:
    """Two WebDataset shards of wide and tall images (+ a sample without a caption)."""
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * n // 2, (shard + 1) * n // 2):
                color = COLORS[i % len(COLORS)]
                size = (32, 16) if i % 2 else (16, 32)
                for name, data in ((f"{i:06d}.png", image_bytes(color, size)),
                                   (f"{i:06d}.txt", f"a {color} field".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("orphan.png")
            data = image_bytes("red", (16, 16))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


def tiny(out: Path, text_folder: Path, data: Path | str, **changes) -> TrainConfig:
    changes = {"samples_with_checkpoints": False, "batch_size": 2, **changes}
    return preset("tiny", out_dir=str(out), model=tiny_model_config(text_folder),
                  data=str(data), **changes)


def test_folder_training_resumes_exactly_and_counts_bad_samples(tmp_path, text_folder):
    data = make_folder(tmp_path / "data")
    straight = Trainer(tiny(tmp_path / "a", text_folder, data, steps=8), command="test")
    straight.train()
    first = Trainer(tiny(tmp_path / "b", text_folder, data, steps=3), command="test")
    first.train()
    resumed = Trainer(tiny(tmp_path / "b", text_folder, data, steps=8, resume=True),
                      command="test")
    assert resumed.step == 3
    resumed.train()  # 8 steps x 2 > 12 images: the stream goes round a second epoch
    for (name, a), b in zip(straight.unwrapped.state_dict().items(),
                            resumed.unwrapped.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log) and log[-1]["step"] == 8
    assert straight.data is not None
    assert straight.data.skips.counts["missing caption"] >= 1
    assert straight.data.skips.counts["unreadable image"] >= 1
    saved = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert saved["data"] == str(data)
    # The sample grid draws the data's own captions, the same after the resume.
    prompts = saved["sample_prompts"]
    assert prompts and all(p.startswith("a ") and p.endswith(" field") for p in prompts)
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["sample_prompts"] \
        == prompts


def test_shards_with_buckets_keep_non_square_images(tmp_path, text_folder):
    shards = make_shards(tmp_path / "shards")
    trainer = Trainer(tiny(tmp_path / "run", text_folder, str(shards / "*.tar"), steps=3,
                           data_buckets=True), command="test")
    trainer.train()
    assert trainer.step == 3 and trainer.data is not None
    batch = next(trainer.data.batches())
    height, width = batch.bucket
    assert height != width and len(batch) == 2  # a wide or tall bucket, not a square crop
    assert trainer.data.skips.counts["missing caption"] >= 1


def test_unusable_data_is_a_clear_error(tmp_path, text_folder):
    with pytest.raises(RequestError, match="data: .* is neither a folder"):
        Trainer(tiny(tmp_path / "x", text_folder, tmp_path / "nope"), command="test").train()
    few = make_folder(tmp_path / "few", n=2)
    trainer = Trainer(tiny(tmp_path / "y", text_folder, few, batch_size=4), command="test")
    with pytest.raises(RequestError, match=r"data: .* gave no full batch of 4 .*--batch-size"):
        trainer.train()


def test_cli_train_on_a_folder(tmp_path, capsys):
    from toile.cli.main import main

    data = make_folder(tmp_path / "data")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--steps", "1",
                 "--data", str(data), "--batch-size", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["data"] == str(data)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r2"), "--buckets"]) == 2
    assert "--buckets applies to --data" in capsys.readouterr().err


def test_export_names_the_data(tmp_path, text_folder):
    data = make_folder(tmp_path / "data")
    trainer = Trainer(tiny(tmp_path / "run", text_folder, data, steps=1), command="test")
    trainer.train()
    card = (trainer.export(tmp_path / "model") / "MODEL_CARD.md").read_text()
    assert f"`{data}` (streamed" in card and "scene world" not in card

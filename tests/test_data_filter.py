"""Training-data governance: an opt-out list (file hashes, perceptual hashes, caption terms)
and an output check leave samples out of `toile train --data` and `toile finetune`, counted by
reason in the log, the model card and the LoRA's metadata."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from test_train_data import image_bytes, make_folder, make_shards, tiny
from toile.errors import ToileError
from toile.safety.data_filter import (
    REASON_CHECK,
    REASON_HASH,
    REASON_PHASH,
    REASON_TERM,
    DataFilter,
    OptOut,
    perceptual_hash,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def photo(seed: int, size: int = 96) -> Image.Image:
    """A textured picture (perceptual hashes need structure, not a flat colour)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_list(path, **values) -> OptOut:
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return OptOut.from_file(path)


def test_each_opt_out_kind_and_its_reason(tmp_path):
    listed, other = photo(1), photo(2)
    data = png(listed)
    opt_out = write_list(tmp_path / "optout.toml", sha256=[hashlib.sha256(data).hexdigest()],
                         phash=[f"{perceptual_hash(listed):016x}"], terms=["Jane Doe"])
    data_filter = DataFilter(opt_out)
    assert data_filter.reason(data, listed, "a portrait") == REASON_HASH
    # the same picture re-encoded and resized: another file, the same perceptual hash
    buffer = io.BytesIO()
    listed.resize((80, 80)).save(buffer, "JPEG", quality=85)
    copy = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    assert data_filter.reason(buffer.getvalue(), copy, "a portrait") == REASON_PHASH
    assert data_filter.reason(png(other), other, "in the style of J.a.n.e  D0e") == REASON_TERM
    assert data_filter.reason(png(other), other, "a janedoeish pattern") is None
    assert data_filter.reason(png(other), other, "a portrait") is None
    assert data_filter.describe()["opt_out"]["sha256"] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [('sha256 = ["abc"]', "64 hex digits"), ('phash = ["xyz"]', "hex strings"),
     ("colour = 1", "unknown key 'colour'"), ("terms = [1]", "list of strings"),
     ("phash_distance = 99", "phash_distance"), ("= broken", "not valid TOML")],
)
def test_bad_opt_out_lists_are_one_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ToileError, match=message):
        OptOut.from_file(path)


def test_the_output_check_leaves_flagged_images_out(tmp_path):
    from test_output_check import make_checker
    from toile.safety.output_check import SDSafetyChecker

    flagged = DataFilter(check=SDSafetyChecker(make_checker(tmp_path / "c", flag=True)))
    assert flagged.reason(png(photo(3)), photo(3), "x") == REASON_CHECK
    assert flagged.describe() == {"output_check": "sd-safety-checker"}


def test_train_counts_what_it_left_out_in_the_log_and_the_card(tmp_path, text_folder):
    from toile.train.trainer import Trainer

    data = make_folder(tmp_path / "data")
    red = (data / "part0" / "000.png").read_bytes()
    opt_out = tmp_path / "optout.toml"
    opt_out.write_text(f'sha256 = ["{hashlib.sha256(red).hexdigest()}"]\nterms = ["green"]\n')
    trainer = Trainer(tiny(tmp_path / "run", text_folder, data, steps=2, opt_out=str(opt_out)),
                      command="test")
    trainer.train()
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    skipped = log[-1]["skipped_by_reason"]
    # the two red squares are the same bytes; two of the twelve captions say green
    assert skipped[REASON_HASH] == 2 and skipped[REASON_TERM] == 2
    card = (trainer.export(tmp_path / "model") / "MODEL_CARD.md").read_text()
    assert "## Data filters" in card and f"`{opt_out}`" in card
    assert f"{REASON_TERM}: 2" in card


def test_shards_and_finetune_sets_honour_the_list(tmp_path):
    from toile.data.shards import TarShards
    from toile.train.finetune.dataset import load_image_set

    opt_out = write_list(tmp_path / "o.toml", terms=["blue field"])
    shards = TarShards(make_shards(tmp_path / "shards"), min_side=8,
                       data_filter=DataFilter(opt_out))
    captions = [sample.caption for sample in shards]
    assert captions and not any("blue" in c for c in captions)
    assert shards.skips.counts[REASON_TERM] == 2
    folder = tmp_path / "ft"
    folder.mkdir()
    for i, color in enumerate(("red", "blue", "green")):
        (folder / f"{i}.png").write_bytes(image_bytes(color, (32, 32)))
        (folder / f"{i}.txt").write_text(f"a {color} field")
    loaded = load_image_set(folder, prompt=None, resolution=32, multiple=8,
                            data_filter=DataFilter(opt_out))
    assert len(loaded) == 2 and loaded.skips.counts[REASON_TERM] == 1

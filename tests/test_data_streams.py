"""Datasets beyond one folder: streamed image-caption folders, WebDataset tar shards and
aspect-ratio bucketing. Bad samples are counted skips, never a crash."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toile.data.buckets import (
    BucketBatcher,
    BucketBatchSampler,
    fit_to_bucket,
    make_buckets,
    nearest_bucket,
)
from toile.data.folders import ImageCaptionFolder, iter_image_files
from toile.data.shards import TarShards, split_member_name
from toile.errors import RequestError


def png_bytes(width: int, height: int, value: int = 100) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_tree(root: Path) -> Path:
    """a/ (2 captioned), b/c/ (1 captioned), top level: uncaptioned, garbage, tiny, hidden."""
    for rel, caption in [("a/1.png", "one"), ("a/2.jpg", "two"), ("b/c/3.png", "three")]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(png_bytes(32, 24))).save(path)
        path.with_suffix(".txt").write_text(caption + "\n")
    Image.open(io.BytesIO(png_bytes(32, 32))).save(root / "nocap.png")
    (root / "garbage.png").write_bytes(b"not an image")
    (root / "garbage.txt").write_text("garbage")
    Image.open(io.BytesIO(png_bytes(4, 4))).save(root / "tiny.png")
    (root / "tiny.txt").write_text("tiny")
    (root / ".hidden").mkdir()
    Image.open(io.BytesIO(png_bytes(32, 32))).save(root / ".hidden" / "x.png")
    (root / "notes.md").write_text("not an image")
    return root


# ----------------------------------------------------------------------------------- folders
def test_folder_walk_is_lazy_sorted_and_skips_hidden(tmp_path):
    root = make_tree(tmp_path)
    walk = iter_image_files(root)
    assert next(walk) == root / "garbage.png"  # a generator: nothing listed beyond need
    rest = [p.relative_to(root).as_posix() for p in walk]
    assert rest == ["nocap.png", "tiny.png", "a/1.png", "a/2.jpg", "b/c/3.png"]


def test_folder_stream_counts_skips(tmp_path):
    data = ImageCaptionFolder(make_tree(tmp_path), min_side=16)
    samples = list(data)
    assert [(s.key, s.caption) for s in samples] == [
        ("a/1.png", "one"), ("a/2.jpg", "two"), ("b/c/3.png", "three")]
    assert samples[0].image.mode == "RGB" and samples[0].image.size == (32, 24)
    assert data.skips.counts == {
        "missing caption": 1, "unreadable image": 1, "smaller than 16 px": 1}
    assert "nocap.png" in data.skips.summary()
    with_default = ImageCaptionFolder(tmp_path, min_side=16, default_caption="x")
    assert len(list(with_default)) == 4


def test_folder_stream_splits_between_processes(tmp_path, monkeypatch):
    root = make_tree(tmp_path)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append([s.key for s in ImageCaptionFolder(root, min_side=16, default_caption="x")])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == ["a/1.png", "a/2.jpg", "b/c/3.png", "nocap.png"]


def test_folder_stream_with_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    root = make_tree(tmp_path)
    data = ImageCaptionFolder(root, min_side=16, transform=lambda s: s.caption)
    loader = DataLoader(data, batch_size=None, num_workers=2)
    assert sorted(loader) == ["one", "three", "two"]


# ------------------------------------------------------------------------------------ shards
def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_member_names_split_like_webdataset():
    assert split_member_name("dir.v2/000123.seg.jpg") == ("dir.v2/000123", "seg.jpg")
    assert split_member_name("000001.TXT") == ("000001", "txt")


def test_shards_group_members_and_count_skips(tmp_path):
    write_shard(tmp_path / "s0.tar", [
        ("000.jpg", png_bytes(32, 32, 10)), ("000.txt", b"first"),
        ("001.png", png_bytes(48, 32, 20)), ("001.txt", b"second"), ("001.json", b"{}"),
        ("002.png", png_bytes(32, 32)),  # no caption
        ("003.txt", b"no image"),
        ("004.png", b"garbage"), ("004.txt", b"broken image"),
    ])
    good = write_shard(tmp_path / "s1.tar", [("100.png", png_bytes(32, 32)),
                                              ("100.txt", b"  spaced   out\ncaption ")])
    data = TarShards(tmp_path, min_side=16)
    samples = list(data)
    assert [s.caption for s in samples] == ["first", "second", "spaced out caption"]
    assert samples[1].image.size == (48, 32) and samples[0].key == "s0.tar:000"
    assert data.skips.counts == {
        "missing caption": 1, "missing image": 1, "unreadable image": 1}
    assert [s.caption for s in TarShards(good)] == ["spaced out caption"]


def test_truncated_shard_is_counted_and_the_next_is_read(tmp_path):
    full = write_shard(tmp_path / "a.tar", [
        (f"{i:03d}.{ext}", png_bytes(32, 32) if ext == "png" else f"cap {i}".encode())
        for i in range(4) for ext in ("png", "txt")
    ])
    # Cut inside the 3rd member's data (each small member is a 512-byte header + 512 of data).
    (tmp_path / "a.tar").write_bytes(full.read_bytes()[: 2 * 1024 + 512 + 50])
    write_shard(tmp_path / "b.tar", [("x.png", png_bytes(32, 32)), ("x.txt", b"from b")])
    shards = TarShards(sorted(tmp_path.glob("*.tar")), min_side=16)
    assert [s.caption for s in shards] == ["cap 0", "from b"]  # the broken sample 001 is lost
    assert shards.skips.counts == {"corrupt or truncated shard": 1}


def test_shards_split_between_processes(tmp_path, monkeypatch):
    for k in range(3):
        write_shard(tmp_path / f"{k}.tar", [(f"{k}-{i}.png", png_bytes(32, 32))
                                             for i in range(2)])
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append([s.key for s in TarShards(str(tmp_path / "*.tar"), default_caption="c")])
    assert not set(seen[0]) & set(seen[1]) and len(seen[0] + seen[1]) == 6
    with pytest.raises(RequestError, match="shards: no such shard"):
        TarShards(tmp_path / "missing.tar")


# ----------------------------------------------------------------------------------- buckets
def test_buckets_have_equal_area_and_the_size_multiple():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and len(buckets) >= 5
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0
        assert abs(height * width / 512**2 - 1) < 0.2  # equal pixel count up to rounding
    assert nearest_bucket(1024, 512, buckets) == buckets.index(max(buckets, key=lambda b: b[1]))
    assert buckets[nearest_bucket(300, 300, buckets)] == (512, 512)
    tall = buckets[nearest_bucket(400, 600, buckets)]
    assert tall[0] > tall[1]


def test_fit_covers_and_centre_crops():
    image = Image.fromarray(np.zeros((100, 300, 3), np.uint8))
    fitted = fit_to_bucket(image, (64, 128))
    assert fitted.image.size == (128, 64)
    assert fitted.original_size == (100, 300) and fitted.crop_top_left == (0, 32)


def test_bucket_batch_sampler_is_deterministic_full_and_within_buckets():
    bucket_of = [0, 0, 0, 1, 1, 2, 0, 1]
    sampler = BucketBatchSampler(bucket_of, 2, seed=3)
    assert sampler.batches_per_epoch == 2 + 1 + 1 + 1  # ceil(4/2) + ceil(3/2) + ceil(1/2)
    epoch = [sampler.batch(s) for s in range(sampler.batches_per_epoch)]
    assert all(len(b) == 2 and len({bucket_of[i] for i in b}) == 1 for b in epoch)
    assert set().union(*epoch) == set(range(len(bucket_of)))  # every item each epoch
    again = BucketBatchSampler(bucket_of, 2, seed=3)
    assert [again.batch(s) for s in range(12)] == [sampler.batch(s) for s in range(12)]
    other = BucketBatchSampler(bucket_of, 2, seed=4)
    assert [other.batch(s) for s in range(12)] != [sampler.batch(s) for s in range(12)]


def test_streaming_batcher_groups_by_bucket(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i, (w, h) in enumerate([(64, 32), (32, 32), (64, 32), (32, 64), (32, 32), (66, 30)]):
        Image.open(io.BytesIO(png_bytes(w, h))).save(root / f"{i}.png")
    buckets = make_buckets(32, 8)
    batches = list(BucketBatcher(ImageCaptionFolder(root, default_caption="c"), buckets, 2))
    sizes = [b.bucket for b in batches]
    assert len(batches) == 4 and sum(len(b) for b in batches) == 6
    for batch in batches:
        assert {im.size for im in batch.images} == {(batch.bucket[1], batch.bucket[0])}
        assert batch.pixels().shape == (len(batch), 3, *batch.bucket)
    assert [len(b) for b in batches[:2]] == [2, 2] and len(set(sizes)) == 3
    dropped = list(BucketBatcher(ImageCaptionFolder(root, default_caption="c"), buckets, 2,
                                 drop_last=True))
    assert all(len(b) == 2 for b in dropped) and len(dropped) == 2

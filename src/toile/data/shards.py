"""WebDataset tar shards, streamed with Python's ``tarfile`` (no extra dependency).

The WebDataset convention (Aizman et al. 2019, the ``webdataset`` package, LAION, img2dataset):
a shard is a plain ``.tar`` whose members are grouped into samples by *key* — the member path
up to the first dot of its file name — and typed by the rest (the extension)::

    000001.jpg  000001.txt  000001.json  000002.png  000002.txt ...

A sample here is the image (``jpg``, ``jpeg``, ``png``, ``webp`` — the first present) and the
caption (``txt``). Members of one sample must be adjacent, as WebDataset writers guarantee;
the tar is read front to back in streaming mode (``r|*``), so a shard can be a pipe or a huge
file and nothing is extracted to disk (no path traversal, no temp files).

``webdataset`` itself is not used: its pipeline adds a dependency for what is ~60 lines of
``tarfile`` here, and its error handling (``handler=``) would still need the skip counting below.

Bad data is counted, never fatal: a sample without an image or caption, an undecodable or
oversized image, a member larger than the cap, and a truncated or corrupt shard (the rest of that
shard is skipped, the next shard is read) all land in :class:`~toile.data.folders.SkipCounter`.

Under several processes / DataLoader workers, shards are split between consumers when there are
at least as many shards as consumers (each shard read once); otherwise every consumer reads all
shards and keeps every n-th sample.
"""

from __future__ import annotations

import glob
import logging
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import IterableDataset

from toile.data.folders import Sample, SkipCounter, consumer_index, decode_image
from toile.errors import RequestError
from toile.io.images import MAX_IMAGE_BYTES

if TYPE_CHECKING:
    from toile.safety.data_filter import DataFilter

LOG = logging.getLogger("toile.data")

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000123.seg.jpg"`` -> (``"dir/000123"``, ``"seg.jpg"``): WebDataset's key/ext split
    at the first dot of the file name (dots in directory names do not count)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder (its ``*.tar``), a glob pattern, one file, or a list of these -> shard paths."""
    items = [spec] if isinstance(spec, str | Path) else list(spec)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(path.glob("*.tar"))
        elif any(ch in str(item) for ch in "*?["):
            found += [Path(p) for p in sorted(glob.glob(str(item)))]
        elif path.is_file():
            found.append(path)
        else:
            raise RequestError("shards", f"no such shard, folder or pattern: {item}")
    if not found:
        raise RequestError("shards", f"no .tar shards found in {spec}")
    return found


class TarShards(IterableDataset):
    """Stream :class:`Sample` objects (or ``transform(sample)``) from WebDataset tar shards."""

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        *,
        min_side: int = 16,
        default_caption: str | None = None,
        transform: Callable[[Sample], Any] | None = None,
        max_member_bytes: int = MAX_IMAGE_BYTES,
        shard_by_consumer: bool = True,
        data_filter: DataFilter | None = None,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        self.data_filter = data_filter
        self.min_side = min_side
        self.default_caption = default_caption
        self.transform = transform
        self.max_member_bytes = max_member_bytes
        self.shard_by_consumer = shard_by_consumer
        self.skips = SkipCounter()

    def __iter__(self) -> Iterator[Any]:
        me, consumers = consumer_index() if self.shard_by_consumer else (0, 1)
        local = SkipCounter()
        if consumers <= len(self.shards):
            mine = [s for i, s in enumerate(self.shards) if i % consumers == me]
            keep = None
        else:  # fewer shards than consumers: everyone reads all, keeps every n-th sample
            mine, keep = self.shards, (me, consumers)
        index = 0
        for shard in mine:
            for sample in self._read_shard(shard, local):
                if keep is None or index % keep[1] == keep[0]:
                    yield sample if self.transform is None else self.transform(sample)
                index += 1
        self.skips.merge(local)
        if local.total:
            LOG.warning("%d shards: %s", len(mine), local.summary())

    def _read_shard(self, shard: Path, skips: SkipCounter) -> Iterator[Sample]:
        current: str | None = None
        members: dict[str, bytes] = {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_member_name(member.name)
                    if key != current:
                        if current is not None:
                            sample = self._make_sample(shard, current, members, skips)
                            if sample is not None:
                                yield sample
                        current, members = key, {}
                    if member.size > self.max_member_bytes:
                        skips.skip("member too large", f"{shard.name}:{member.name}")
                        members["__too_large__"] = b""
                        continue
                    handle = tar.extractfile(member)
                    if handle is not None:
                        members[ext] = handle.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            # A truncated or corrupt shard: what was read is kept, the rest is lost; count it
            # and move on to the next shard instead of ending the run.
            skips.skip("corrupt or truncated shard", f"{shard.name} ({exc})")
            current = None  # the sample being read when the shard broke is incomplete
        if current is not None:
            sample = self._make_sample(shard, current, members, skips)
            if sample is not None:
                yield sample

    def _make_sample(
        self, shard: Path, key: str, members: dict[str, bytes], skips: SkipCounter
    ) -> Sample | None:
        where = f"{shard.name}:{key}"
        if "__too_large__" in members:
            return None  # already counted
        data = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if data is None:
            skips.skip("missing image", where)
            return None
        caption = None
        if CAPTION_EXTENSION in members:
            try:
                caption = members[CAPTION_EXTENSION].decode("utf-8").strip() or None
            except UnicodeDecodeError:
                caption = None
        caption = caption or self.default_caption
        if caption is None:
            skips.skip("missing caption", where)
            return None
        image, reason = decode_image(data, where=where, min_side=self.min_side)
        if image is None:
            skips.skip(reason, where)
            return None
        caption = " ".join(caption.split())
        left_out = self.data_filter.reason(data, image, caption) if self.data_filter else None
        if left_out is not None:
            skips.skip(left_out, where)
            return None
        return Sample(key=where, image=image, caption=caption)

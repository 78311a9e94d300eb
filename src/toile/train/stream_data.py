"""Batches from the user's own data for ``toile train --data PATH``, streamed.

``PATH`` is an image-caption folder of any size (``toile.data.folders``: ``name.png`` +
``name.txt``, nested folders, walked lazily) or WebDataset tar shards (``toile.data.shards``:
a ``.tar``, a glob such as ``shards/{0..9}*.tar`` written as ``'shards/*.tar'``, or a folder
whose top level holds ``.tar`` files). Nothing is loaded whole.

The stream runs through a seeded shuffle buffer (as WebDataset's ``shuffle(n)``; folders are
walked in name order and shards are often written class by class), then into one batch per
aspect-ratio bucket (``toile.data.buckets.BucketBatcher``, square only unless ``buckets``),
always full (``drop_last``), epoch after epoch. Bad samples are skipped and counted
(``skips``), never fatal; data with no full batch at all is a ``RequestError`` on ``data``.

Exact resume: the stream, the shuffle (seeded by seed, epoch and consumer) and the batching are
deterministic, so the batch of step k is the k-th batch of the replayed stream; a resumed run
replays the stream up to its step (reading, not training — it costs a pass over the data seen so
far) and goes on exactly as a straight run would. Under several processes each reads its own
share of the stream (``consumer_index``).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.data.buckets import BucketBatch, BucketBatcher, make_buckets
from toile.data.folders import Sample, SkipCounter, consumer_index
from toile.errors import RequestError

if TYPE_CHECKING:
    from toile.safety.data_filter import DataFilter

SHUFFLE_BUFFER = 1000  # samples held for shuffling (WebDataset examples use 1000-5000)


def is_shards(spec: str) -> bool:
    """A ``.tar`` file, a glob pattern, or a folder whose top level holds ``.tar`` files."""
    path = Path(spec).expanduser()
    return (any(ch in spec for ch in "*?[") or path.is_file()
            or (path.is_dir() and any(path.glob("*.tar"))))


def open_stream(
    spec: str, *, min_side: int, default_caption: str | None = None, field: str = "data",
    data_filter: DataFilter | None = None,
) -> Any:
    """``ImageCaptionFolder`` or ``TarShards`` for ``spec`` (see the module docstring);
    samples without a caption take ``default_caption`` (or are skipped and counted)."""
    from toile.data.folders import ImageCaptionFolder
    from toile.data.shards import TarShards

    path = Path(spec).expanduser()
    if is_shards(spec):
        try:
            return TarShards(spec if any(ch in spec for ch in "*?[") else path,
                             min_side=min_side, default_caption=default_caption,
                             data_filter=data_filter)
        except RequestError as exc:
            raise RequestError(field, str(exc).split(": ", 1)[-1]) from None
    if path.is_dir():
        return ImageCaptionFolder(path, min_side=min_side, default_caption=default_caption,
                                  data_filter=data_filter)
    raise RequestError(
        field, f"{spec} is neither a folder of images with captions nor WebDataset .tar shards"
    )


def shuffled(samples: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Reservoir-style shuffle buffer: fill ``size`` samples, then emit a random one for each
    new one; drain in random order at the end."""
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class StreamBatches:
    """Endless full batches from ``spec`` for steps ``start, start + 1, ...``.

    ``image_size`` is the training resolution (the square bucket's side); ``multiple`` the
    model's size multiple, for the other buckets.
    """

    def __init__(
        self,
        spec: str,
        *,
        batch_size: int,
        image_size: int,
        multiple: int,
        seed: int,
        buckets: bool = False,
        min_side: int | None = None,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        default_caption: str | None = None,
        field: str = "data",
        data_filter: DataFilter | None = None,
    ) -> None:
        self.source = open_stream(spec, min_side=min_side or max(1, image_size // 4),
                                  default_caption=default_caption, field=field,
                                  data_filter=data_filter)
        self.spec = spec
        self.field = field
        self.batch_size = batch_size
        self.ladder = make_buckets(image_size, multiple) if buckets else [(image_size,) * 2]
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self._first_pass: SkipCounter | None = None

    @property
    def skips(self) -> SkipCounter:
        """Samples this process skipped in one pass over its share of the data (counted when
        the first pass ends: the folder and shard readers count at the end of a pass)."""
        return self._first_pass if self._first_pass is not None else self.source.skips

    def _epoch(self, epoch: int) -> Iterator[BucketBatch]:
        me, _ = consumer_index()
        rng = random.Random(f"toile-stream:{self.seed}:{epoch}:{me}")
        samples = shuffled(self.source, self.shuffle_buffer, rng)
        yield from BucketBatcher(samples, self.ladder, self.batch_size, drop_last=True)

    def batches(self, start: int = 0) -> Iterator[BucketBatch]:
        """Batch ``start``, ``start + 1``, ... (the first ``start`` are read and dropped)."""
        produced, epoch = 0, 0
        while True:
            empty = True
            for batch in self._epoch(epoch):
                empty = False
                if produced >= start:
                    yield batch
                produced += 1
            if self._first_pass is None:
                self._first_pass = copy.deepcopy(self.source.skips)
            if empty:
                raise RequestError(
                    self.field, f"{self.spec} gave no full batch of {self.batch_size} (per "
                    f"process): {self.skips.summary()}; add data or lower --batch-size",
                )
            epoch += 1

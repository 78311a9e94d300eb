"""Aspect-ratio bucketing: train on non-square images without cropping most of them away.

NovelAI's aspect-ratio bucketing (2022; also kohya's sd-scripts and diffusers' training
scripts): choose a set of *buckets* — (height, width) pairs of about the same pixel count as
``resolution²``, with sides a multiple of the family's size multiple (VAE scale × patch) — put
each image in the bucket whose aspect ratio is nearest its own, resize it to cover the bucket
and centre-crop the rest. A batch is drawn within one bucket, so it is one rectangular tensor.

The bucket ladder comes from diffusers (``training_utils.generate_aspect_ratio_buckets``: 1:1,
4:5, 2:3, 3:4, 9:16, 1:2 and their transposes, rounded to the multiple). The nearest bucket is
chosen by the distance of log aspect ratios, which treats 1:2 and 2:1 alike (diffusers'
``find_nearest_bucket`` compares cross products, which favours narrow buckets).

Two batchers:

- :class:`BucketBatchSampler` for datasets held in memory (fine-tuning): the batch of step *k* is
  a pure function of (seed, k), so resume and multi-process runs need no sampler state. Every
  batch is full (a bucket's last batch is topped up by wrapping around its shuffled list), so
  each process always gets an equal share.
- :class:`BucketBatcher` for streams (folders, shards): samples fill one buffer per bucket; a
  full buffer is a batch.

Sizes are (height, width) everywhere here, as diffusers' SDXL ``original_size`` / ``target_size``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.utils.data import IterableDataset

from toile.errors import RequestError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.data.folders import Sample

Bucket = tuple[int, int]  # (height, width)


def make_buckets(resolution: int, multiple: int) -> list[Bucket]:
    """Buckets of about ``resolution²`` pixels, sides multiples of ``multiple``, sorted by aspect.

    The square ``(resolution, resolution)`` is always one of them (rounded to the multiple).
    """
    from diffusers.training_utils import generate_aspect_ratio_buckets

    if resolution < multiple or multiple < 1:
        raise RequestError(
            "resolution", f"must be at least the size multiple {multiple}, got {resolution}"
        )
    buckets = generate_aspect_ratio_buckets(resolution, divisibility=multiple)
    square = max(multiple, round(resolution / multiple) * multiple)
    unique = set(buckets) | {(square, square)}
    return sorted(unique, key=lambda hw: (hw[1] / hw[0], hw[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space) to ``width/height``."""
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0])
                                                      - aspect))


@dataclass(frozen=True)
class Fitted:
    """An image resized to cover a bucket and centre-cropped to it, with SDXL's micro-conditions
    (Podell et al. 2023): the original size and the crop's top-left corner, both (y, x)."""

    image: Image.Image
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Fitted:
    """Scale ``image`` so it covers ``bucket`` (aspect kept), then centre-crop to it."""
    from PIL import Image

    height, width = bucket
    scale = max(width / image.width, height / image.height)
    new_w = max(width, round(image.width * scale))
    new_h = max(height, round(image.height * scale))
    resized = image if (new_w, new_h) == image.size else image.resize(
        (new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None
    )
    top, left = (new_h - height) // 2, (new_w - width) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    return Fitted(cropped, (image.height, image.width), (top, left))


def pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> float32 [B, 3, H, W] in [−1, 1]."""
    import numpy as np
    import torch

    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


class BucketBatchSampler:
    """Deterministic, always-full batches of indices, each from one bucket (see module doc).

    ``bucket_of[i]`` is the bucket of item ``i``. ``batch(step)`` is a pure function of
    (seed, step): within an epoch every item appears at least once; buckets with fewer items
    than ``batch_size`` repeat items to fill their batch.
    """

    def __init__(self, bucket_of: Sequence[int], batch_size: int, *, seed: int = 0) -> None:
        if not bucket_of:
            raise RequestError("images", "no usable images to draw batches from")
        if batch_size < 1:
            raise RequestError("batch_size", f"must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.members: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            self.members.setdefault(bucket, []).append(index)
        self.batches_per_epoch = sum(
            math.ceil(len(m) / batch_size) for m in self.members.values()
        )
        self._cached: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch, in order."""
        rng = random.Random(f"toile-buckets:{self.seed}:{epoch}")
        batches: list[list[int]] = []
        for bucket in sorted(self.members):
            order = list(self.members[bucket])
            rng.shuffle(order)
            count = math.ceil(len(order) / self.batch_size)
            needed = count * self.batch_size
            # Top up the last batch by wrapping around (repeating as often as needed).
            order = [order[i % len(order)] for i in range(needed)]
            batches += [order[i : i + self.batch_size] for i in range(0, needed, self.batch_size)]
        rng.shuffle(batches)
        return batches

    def batch(self, step: int) -> list[int]:
        """The batch of global step ``step`` (0-based)."""
        epoch, index = divmod(step, self.batches_per_epoch)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.epoch(epoch))
        return self._cached[1][index]

    def __iter__(self) -> Iterator[list[int]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1


@dataclass
class BucketBatch:
    """A batch from one bucket: fitted images, their captions and SDXL micro-conditions."""

    bucket: Bucket
    keys: list[str]
    images: list[Image.Image]
    captions: list[str]
    original_sizes: list[tuple[int, int]]
    crops_top_left: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self) -> torch.Tensor:
        return pixels(self.images)


class BucketBatcher(IterableDataset):
    """Group a stream of samples into batches of one bucket each.

    One buffer per bucket; when a buffer holds ``batch_size`` samples it is yielded. At the end
    of the stream, partial buffers are yielded too unless ``drop_last``. ``transform(batch)``
    (e.g. to tensors) is applied to each batch. Use with ``DataLoader(batcher, batch_size=None)``.
    """

    def __init__(
        self,
        source: Iterable[Sample],
        buckets: Sequence[Bucket],
        batch_size: int,
        *,
        drop_last: bool = False,
        transform: Callable[[BucketBatch], Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise RequestError("batch_size", f"must be at least 1, got {batch_size}")
        if not buckets:
            raise RequestError("buckets", "need at least one bucket")
        self.source = source
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.transform = transform

    def __iter__(self) -> Iterator[Any]:
        buffers: dict[int, list[tuple[Sample, Fitted]]] = {}
        for sample in self.source:
            index = nearest_bucket(sample.image.width, sample.image.height, self.buckets)
            buffer = buffers.setdefault(index, [])
            buffer.append((sample, fit_to_bucket(sample.image, self.buckets[index])))
            if len(buffer) == self.batch_size:
                yield self._emit(index, buffer)
                buffers[index] = []
        if not self.drop_last:
            for index in sorted(buffers):
                if buffers[index]:
                    yield self._emit(index, buffers[index])

    def _emit(self, index: int, items: list[tuple[Sample, Fitted]]) -> Any:
        batch = BucketBatch(
            bucket=self.buckets[index],
            keys=[s.key for s, _ in items],
            images=[f.image for _, f in items],
            captions=[s.caption for s, _ in items],
            original_sizes=[f.original_size for _, f in items],
            crops_top_left=[f.crop_top_left for _, f in items],
        )
        return batch if self.transform is None else self.transform(batch)

"""What each micro-batch of a fine-tuning step holds: instance images and class images.

A step's global batch is its micro-batches in order (``gradient_accumulation_steps`` of them),
each split over the processes in rank order, so a sample's *position* in the global batch is
``(micro · processes + rank) · batch_size + j``. Which images a step draws
(:class:`~toile.data.buckets.BucketBatchSampler`, one aspect bucket per step) and every random
draw of a sample (t, noise, VAE sample: :func:`sample_generator` of seed, step and position)
depend only on the seed, the step and that position. Hence exact ``--resume``, and N processes
× batch B × K micro-batches train like one process with batch N·B·K.

Class images (prior preservation) take the positions after the whole instance batch, so their
draws too are the same however the step is split. A streamed image set instead yields each
process's batches in order (a resumed run replays it to its micro-batch).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from toile.data.buckets import BucketBatch, BucketBatchSampler
from toile.data.folders import SkipCounter
from toile.train.finetune.config import FinetuneConfig
from toile.train.finetune.dataset import ImageSet, load_image_set
from toile.train.stream_data import StreamBatches

# (bucket, pixels [b, 3, H, W] in [-1, 1], captions, original sizes, crop corners)
InstanceBatch = tuple[Any, torch.Tensor, list[str], list, list]


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The CPU generator of the sample at ``position`` in the global batch of ``step``."""
    mixed = random.Random(f"toile-finetune:{seed}:{step}:{position}").getrandbits(63)
    return torch.Generator("cpu").manual_seed(mixed)


class FinetuneBatches:
    """The instance images (a loaded set or a stream) and the class images of one run, and
    the slice of each step that one process trains on."""

    def __init__(self, config: FinetuneConfig, *, resolution: int, multiple: int,
                 processes: int, rank: int, echo: Callable[[str], None]) -> None:
        """``echo`` reports what was loaded (pass a no-op on all but one process)."""
        self.config = config
        self.resolution, self.multiple = resolution, multiple
        self.processes, self.rank = processes, rank
        from toile.safety.data_filter import build_filter

        self.data_filter = build_filter(config.opt_out, config.filter_checker)
        self.data: ImageSet | None = None
        self.stream: StreamBatches | None = None
        self._batches: Iterator[BucketBatch] | None = None
        if config.streamed:
            self.stream = StreamBatches(
                config.images, batch_size=config.batch_size, image_size=resolution,
                multiple=multiple, seed=config.seed, buckets=config.buckets,
                min_side=config.min_image_side, default_caption=config.prompt, field="images",
                data_filter=self.data_filter,
            )
            echo(f"images: streamed from {config.images} (skips are counted per pass)")
        else:
            self.data = self._load_images(echo)
        self.prior = self._load_class_images(echo) if config.prior_preservation else None
        # One optimizer step's samples: every micro-batch of every process.
        self.global_batch = config.batch_size * processes * config.gradient_accumulation_steps
        self.sampler = (BucketBatchSampler(self.data.bucket_of, self.global_batch,
                                           seed=config.seed)
                        if self.data is not None else None)
        self.prior_sampler = (
            BucketBatchSampler([0] * len(self.prior), self.global_batch, seed=config.seed + 1)
            if self.prior is not None else None
        )

    # ------------------------------------------------------------------------- loading
    def _load_images(self, echo: Callable[[str], None]) -> ImageSet:
        config = self.config
        data = load_image_set(
            config.images, prompt=config.prompt, resolution=self.resolution,
            multiple=self.multiple, buckets=config.buckets, min_side=config.min_image_side,
            data_filter=self.data_filter,
        )
        sizes = sorted({f"{data.buckets[b][1]}x{data.buckets[b][0]}" for b in data.bucket_of})
        echo(f"images: {len(data)} from {data.root} at {', '.join(sizes)}")
        if data.skips.total:
            echo(f"images: {data.skips.summary()}")
        return data

    def _load_class_images(self, echo: Callable[[str], None]) -> ImageSet:
        from toile.train.finetune.prior import class_image_paths

        config = self.config
        if config.class_data:
            # The user's own class images: checked like training images (counted skips).
            prior = load_image_set(
                config.class_data, prompt=config.class_prompt, resolution=self.resolution,
                multiple=self.multiple, field_name="class_data", prompt_field="class_prompt",
                data_filter=self.data_filter,
            )
            echo(f"class images: {len(prior)} from {prior.root}"
                 + (f" ({prior.skips.summary()})" if prior.skips.total else ""))
            return prior
        folder = config.class_images_dir
        return load_image_set(
            folder, prompt=config.class_prompt, resolution=self.resolution,
            multiple=self.multiple, min_side=1, field_name="class_images",
            files=class_image_paths(folder, config.num_class_images),
        )

    # ----------------------------------------------------------------------- what it is
    @property
    def skips(self) -> SkipCounter:
        """Bad images skipped (loaded set) or skipped in one pass (stream)."""
        if self.data is not None:
            return self.data.skips
        assert self.stream is not None
        return self.stream.skips

    def fingerprint(self) -> str:
        """The image set's content hash; a stream is known by its path (hashing it would
        mean reading all of it)."""
        return self.data.fingerprint() if self.data is not None else f"stream:{self.config.images}"

    def class_fingerprint(self) -> str | None:
        return self.prior.fingerprint() if self.prior is not None else None

    # -------------------------------------------------------------------------- batches
    def offset(self, micro: int) -> int:
        """Where this process's samples of micro-batch ``micro`` start in the global batch."""
        return (micro * self.processes + self.rank) * self.config.batch_size

    def instance(self, step: int, micro: int) -> InstanceBatch:
        """This process's instance images of micro-batch ``micro`` of ``step``: its slice of
        the global batch, or its stream's next batch."""
        config = self.config
        if self.stream is not None:
            if self._batches is None:  # the first call: replay the stream up to here
                self._batches = self.stream.batches(
                    start=step * config.gradient_accumulation_steps + micro)
            batch = next(self._batches)
            return (batch.bucket, batch.pixels(), batch.captions, batch.original_sizes,
                    batch.crops_top_left)
        assert self.data is not None and self.sampler is not None
        start = self.offset(micro)
        mine = self.sampler.batch(step)[start:start + config.batch_size]
        bucket = self.data.buckets[self.data.examples[mine[0]].bucket]
        return (bucket, *self.data.batch(mine))

    def instance_generators(self, step: int, micro: int) -> list[torch.Generator]:
        start = self.offset(micro)
        return [sample_generator(self.config.seed, step, start + j)
                for j in range(self.config.batch_size)]

    def classes(self, step: int, micro: int, bucket: Any) -> tuple[torch.Tensor, list, list, list]:
        """This process's class images of micro-batch ``micro`` of ``step`` at the instance
        bucket's size: (pixels, captions, original sizes, crop corners)."""
        assert self.prior is not None and self.prior_sampler is not None
        start = self.offset(micro)
        ids = self.prior_sampler.batch(step)[start:start + self.config.batch_size]
        return self.prior.batch(ids, bucket=bucket)

    def class_generators(self, step: int, micro: int) -> list[torch.Generator]:
        """The class samples' generators: the positions after the whole instance batch."""
        start = self.global_batch + self.offset(micro)
        return [sample_generator(self.config.seed, step, start + j)
                for j in range(self.config.batch_size)]

"""Batches from the scene world, a pure function of (seed, step, rank).

Each batch is drawn with its own ``random.Random`` seeded from (seed, step, rank), so a run
resumed at step k sees exactly the batches a straight run would have seen from step k on, and
each process of a multi-process run sees different data without any coordination.

Images come back as float tensors [B, 3, H, W] in [−1, 1] plus their captions; the trainer
encodes captions with the frozen text encoder once per batch (cheap next to a U-Net step).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset

from toile.families.toile.pipeline import images_to_tensor


@dataclass
class SceneBatch:
    step: int
    images: torch.Tensor  # [B, 3, H, W] in [−1, 1]
    captions: list[str]


def batch_rng(seed: int, step: int, rank: int) -> random.Random:
    # String seeds are hashed with SHA-512 by ``random.seed`` (independent of PYTHONHASHSEED).
    return random.Random(f"toile-scenes:{seed}:{step}:{rank}")


def make_batch(
    seed: int,
    step: int,
    batch_size: int,
    *,
    image_size: int,
    rank: int = 0,
    kinds: tuple[str, ...] = ("single", "relation", "count"),
    allow_held_out: bool = False,
) -> SceneBatch:
    """The batch for ``step`` on process ``rank``."""
    from toile.data.scenes import generate_pair

    rng = batch_rng(seed, step, rank)
    images, captions = [], []
    for _ in range(batch_size):
        image, text, _scene = generate_pair(
            rng, image_size, allow_held_out=allow_held_out, phrasing="train", kinds=kinds
        )
        images.append(image)
        captions.append(text)
    return SceneBatch(step=step, images=images_to_tensor(images), captions=captions)


class SceneBatches(IterableDataset):
    """Batches for steps ``start, start + 1, ...`` (endless, or up to ``stop``)."""

    def __init__(
        self,
        seed: int,
        batch_size: int,
        *,
        image_size: int,
        start: int = 0,
        stop: int | None = None,
        rank: int = 0,
        kinds: tuple[str, ...] = ("single", "relation", "count"),
        allow_held_out: bool = False,
    ) -> None:
        super().__init__()
        self.seed, self.batch_size, self.image_size = seed, batch_size, image_size
        self.start, self.stop, self.rank = start, stop, rank
        self.kinds, self.allow_held_out = tuple(kinds), allow_held_out

    def __iter__(self) -> Iterator[SceneBatch]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield make_batch(
                self.seed, step, self.batch_size, image_size=self.image_size, rank=self.rank,
                kinds=self.kinds, allow_held_out=self.allow_held_out,
            )
            step += 1

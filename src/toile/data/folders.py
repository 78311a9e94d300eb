"""Image-caption folders of any size, streamed: walk the tree lazily, decode one image at a time.

The layout is kohya's (and most trainers'): an image ``name.png`` (or .jpg, .jpeg, .webp,
.bmp) with its caption in ``name.txt`` beside it, in any number of nested folders. An image
without a caption file gets ``default_caption`` (DreamBooth's "instance prompt") or is skipped.

:class:`ImageCaptionFolder` is a ``torch.utils.data.IterableDataset``: it never lists the whole
tree up front (``os.scandir`` one directory at a time, entries sorted so the order is the same
on every machine), so a folder of millions of files starts streaming at once. Under several
processes (``accelerate launch``) and/or DataLoader workers, sample ``i`` of the walk goes to
consumer ``i mod n``: every image is read by exactly one consumer.

Bad samples never stop the stream: an unreadable or truncated image, a decompression bomb, an
image below ``min_side`` or a missing caption is *skipped and counted*; :class:`SkipCounter`
keeps the counts (with a few example paths) and ``summary()`` prints them. Skips found inside
DataLoader worker processes are logged by the worker when its share of the walk ends (the
parent's counter only sees its own, i.e. ``num_workers=0``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import IterableDataset

from toile.errors import RequestError

if TYPE_CHECKING:
    from PIL import Image

    from toile.safety.data_filter import DataFilter

LOG = logging.getLogger("toile.data")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 64 * 1024  # a caption is a sentence or two; a huge .txt is not a caption
EXAMPLES_PER_REASON = 5


@dataclass
class SkipCounter:
    """Counts of skipped samples by reason, with the first few offending paths per reason."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < EXAMPLES_PER_REASON and where not in seen:
            seen.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipCounter) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            seen = self.examples.setdefault(reason, [])
            fresh = [w for w in other.examples.get(reason, []) if w not in seen]
            seen.extend(fresh[: EXAMPLES_PER_REASON - len(seen)])

    def summary(self) -> str:
        """One line per reason, e.g. ``skipped 3 samples: 2 unreadable image (a.png, b.png)...``"""
        if not self.total:
            return "skipped 0 samples"
        parts = [
            f"{n} {reason} ({', '.join(self.examples.get(reason, []))})"
            for reason, n in self.counts.most_common()
        ]
        return f"skipped {self.total} samples: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}


@dataclass
class Sample:
    """One decoded training example. ``key`` names it (a relative path or a shard member)."""

    key: str
    image: Image.Image
    caption: str


def consumer_index() -> tuple[int, int]:
    """(this consumer's index, number of consumers) over processes x DataLoader workers.

    The process rank comes from ``torch.distributed`` when it is initialised, else from the
    ``RANK`` / ``WORLD_SIZE`` variables that ``accelerate launch`` and ``torchrun`` set.
    """
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world * workers


def iter_image_files(root: Path) -> Iterator[Path]:
    """Image files under ``root``: a folder's files by name, then its subfolders by name, each
    the same way (so the order is the same on every machine).

    Lazy: one directory is listed at a time. Hidden entries (``.name``) are skipped, and
    symlinked directories are not followed (a link cycle would never end).
    """
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listed = sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            LOG.warning("cannot list %s: %s", folder, exc)
            continue
        subfolders = []
        for entry in listed:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(Path(entry.path))
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(entry.path)
        stack.extend(reversed(subfolders))  # so that subfolders are visited in name order


def read_caption(image_path: Path) -> str | None:
    """The caption in ``name.txt`` beside ``name.png``: stripped, lines joined by spaces.

    None when there is no caption file or it is empty; a caption file that is not UTF-8 or is
    absurdly large is None as well (and the caller counts the image as uncaptioned).
    """
    path = image_path.with_suffix(CAPTION_SUFFIX)
    try:
        if not path.is_file() or path.stat().st_size > MAX_CAPTION_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or None


def decode_image(data: bytes, *, where: str, min_side: int) -> tuple[Image.Image | None, str]:
    """Decode (bomb-checked, fully loaded) to RGB; ``(None, reason)`` when it cannot be used.

    Transparent images are composited over white: dropping the alpha channel would turn every
    transparent pixel into whatever colour its RGB happens to hold (often black).
    """
    from PIL import Image

    from toile.errors import ImageInputError
    from toile.io.images import open_image

    try:
        image = open_image(data, field=where)
    except ImageInputError as exc:
        reason = "too large" if "pixels are allowed" in str(exc) else "unreadable image"
        return None, reason
    if min(image.size) < min_side:
        return None, f"smaller than {min_side} px"
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return (image if image.mode == "RGB" else image.convert("RGB")), ""


class ImageCaptionFolder(IterableDataset):
    """Stream ``(image, caption)`` samples from a folder tree (see the module docstring).

    Iterating yields :class:`Sample` objects, or ``transform(sample)`` when a transform is
    given (e.g. bucketing + to-tensor). ``skips`` counts what was skipped in this process.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        default_caption: str | None = None,
        min_side: int = 16,
        transform: Callable[[Sample], Any] | None = None,
        shard_by_consumer: bool = True,
        data_filter: DataFilter | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.data_filter = data_filter
        if not self.root.is_dir():
            raise RequestError("images", f"{self.root} is not a folder")
        self.default_caption = default_caption
        self.min_side = min_side
        self.transform = transform
        self.shard_by_consumer = shard_by_consumer
        self.skips = SkipCounter()

    def __iter__(self) -> Iterator[Any]:
        me, consumers = consumer_index() if self.shard_by_consumer else (0, 1)
        local = SkipCounter()
        for index, path in enumerate(iter_image_files(self.root)):
            if index % consumers != me:
                continue
            sample = self._load(path, local)
            if sample is not None:
                yield sample if self.transform is None else self.transform(sample)
        self.skips.merge(local)
        if local.total:
            LOG.warning("%s: %s", self.root, local.summary())

    def _load(self, path: Path, skips: SkipCounter) -> Sample | None:
        key = str(path.relative_to(self.root))
        caption = read_caption(path) or self.default_caption
        if caption is None:
            skips.skip("missing caption", key)
            return None
        try:
            data = path.read_bytes()
        except OSError:
            skips.skip("unreadable image", key)
            return None
        image, reason = decode_image(data, where=key, min_side=self.min_side)
        if image is None:
            skips.skip(reason, key)
            return None
        left_out = self.data_filter.reason(data, image, caption) if self.data_filter else None
        if left_out is not None:
            skips.skip(left_out, key)
            return None
        return Sample(key=key, image=image, caption=caption)

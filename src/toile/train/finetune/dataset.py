"""The fine-tuning image set: a folder of images with optional captions, held in memory.

Layout (kohya's convention): ``name.png`` (or .jpg, .jpeg, .webp, .bmp) with its caption in
``name.txt`` beside it, in the folder or its subfolders. An image without a caption file gets
``--prompt`` — with no captions at all, that is DreamBooth's *instance prompt* (Ruiz et al.
2022), e.g. "a photo of sks dog". A caption file wins over ``--prompt``.

Fine-tuning sets are small (a handful to a few thousand images), so every image is decoded,
checked and fitted to its training size once, before the first step: a bad file is found and
counted up front, never halfway through a run. Bad data:

- an unreadable, truncated or oversized image, or one below ``min_side``: skipped and counted
  (the summary is printed); if nothing usable is left, an error names the folder;
- an image without a caption when there is no ``--prompt``: an error naming ``--prompt``
  (training on an empty caption would silently teach the unconditional model instead).

Images are resized to cover their training size and centre-cropped (DreamBooth's transform); with
bucketing, the training size is the nearest aspect-ratio bucket (:mod:`toile.data.buckets`).
For large datasets stream them instead (:mod:`toile.data.folders`, :mod:`toile.data.shards`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from toile.data.buckets import Bucket, fit_to_bucket, make_buckets, nearest_bucket, pixels
from toile.data.folders import SkipCounter, decode_image, iter_image_files, read_caption
from toile.errors import RequestError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.safety.data_filter import DataFilter

MAX_MISSING_LISTED = 5


@dataclass(frozen=True)
class Example:
    """One training image fitted to its bucket, with its caption and SDXL micro-conditions."""

    key: str
    image: Image.Image
    caption: str
    bucket: int
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


@dataclass
class ImageSet:
    """Examples in memory plus the buckets they use and what was skipped while loading."""

    root: Path
    examples: list[Example]
    buckets: list[Bucket]
    skips: SkipCounter = field(default_factory=SkipCounter)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def bucket_of(self) -> list[int]:
        return [e.bucket for e in self.examples]

    def fingerprint(self) -> str:
        """SHA-256 of keys, captions, sizes and pixels: resume only on the same data."""
        digest = hashlib.sha256()
        for e in self.examples:
            digest.update(f"{e.key}\0{e.caption}\0{e.image.size}\0".encode())
            digest.update(e.image.tobytes())
        return digest.hexdigest()

    def batch(
        self, indices: list[int], bucket: Bucket | None = None
    ) -> tuple[torch.Tensor, list[str], list[tuple[int, int]], list[tuple[int, int]]]:
        """Pixels [B, 3, H, W] in [−1, 1], captions, original sizes, crop corners.

        With ``bucket``, images of another size are re-fitted to it (class images are square,
        and join the instance images' bucket; see ``runner``).
        """
        images, sizes, crops = [], [], []
        for i in indices:
            e = self.examples[i]
            if bucket is not None and (e.image.height, e.image.width) != bucket:
                fitted = fit_to_bucket(e.image, bucket)
                images.append(fitted.image)
                sizes.append(e.original_size)
                crops.append(fitted.crop_top_left)
            else:
                images.append(e.image)
                sizes.append(e.original_size)
                crops.append(e.crop_top_left)
        return pixels(images), [self.examples[i].caption for i in indices], sizes, crops


def index_images(
    root: str | Path, *, prompt: str | None, field_name: str = "images",
    files: list[Path] | None = None, prompt_field: str = "prompt",
) -> list[tuple[Path, str]]:
    """(image path, caption) for every image under ``root`` (or ``files``), without decoding.

    Cheap (a directory walk and the caption files), so a run checks its captions before it
    loads a model: an uncaptioned image without a fallback caption is an error naming the
    option that gives one (``prompt_field``: ``--prompt``, or ``--class-prompt`` for class data).
    """
    folder = Path(root)
    if not folder.is_dir():
        raise RequestError(field_name, f"{folder} is not a folder of images")
    found: list[tuple[Path, str]] = []
    uncaptioned: list[str] = []
    paths = files if files is not None else list(iter_image_files(folder))
    for path in paths:
        caption = read_caption(path) or prompt
        if caption is None:
            uncaptioned.append(str(path.relative_to(folder)))
        else:
            found.append((path, caption))
    if uncaptioned:
        listed = ", ".join(uncaptioned[:MAX_MISSING_LISTED])
        more = (f" and {len(uncaptioned) - MAX_MISSING_LISTED} more"
                if len(uncaptioned) > MAX_MISSING_LISTED else "")
        option = "--" + prompt_field.replace("_", "-")
        raise RequestError(
            prompt_field,
            f"{len(uncaptioned)} of {len(paths)} images in {folder} have no caption file "
            f"(NAME.txt beside NAME.png): {listed}{more}. Give {option} TEXT to caption them "
            f"(e.g. {option} 'a photo of sks dog'), or add the .txt files",
        )
    return found


def load_image_set(
    root: str | Path,
    *,
    prompt: str | None,
    resolution: int,
    multiple: int,
    buckets: bool = False,
    min_side: int | None = None,
    field_name: str = "images",
    files: list[Path] | None = None,
    prompt_field: str = "prompt",
    data_filter: DataFilter | None = None,
) -> ImageSet:
    """Read, check and fit every image under ``root`` (or just ``files`` in it), as the module
    docstring says."""
    folder = Path(root)
    indexed = index_images(folder, prompt=prompt, field_name=field_name, files=files,
                           prompt_field=prompt_field)
    if resolution % multiple:
        raise RequestError(
            "resolution", f"{resolution} must be a multiple of {multiple} for this model"
        )
    ladder = make_buckets(resolution, multiple) if buckets else [(resolution, resolution)]
    min_side = max(1, resolution // 4) if min_side is None else min_side
    skips = SkipCounter()
    examples: list[Example] = []
    for path, caption in indexed:
        key = str(path.relative_to(folder))
        try:
            data = path.read_bytes()
        except OSError:
            skips.skip("unreadable image", key)
            continue
        image, reason = decode_image(data, where=key, min_side=min_side)
        if image is None:
            skips.skip(reason, key)
            continue
        left_out = data_filter.reason(data, image, caption) if data_filter else None
        if left_out is not None:
            skips.skip(left_out, key)
            continue
        index = nearest_bucket(image.width, image.height, ladder)
        fitted = fit_to_bucket(image, ladder[index])
        examples.append(
            Example(key, fitted.image, caption, index, fitted.original_size, fitted.crop_top_left)
        )
    if not examples:
        found = "no images" if not indexed else skips.summary()
        raise RequestError(
            field_name,
            f"no usable images in {folder} ({found}); expected .png/.jpg/.jpeg/.webp/.bmp files "
            f"of at least {min_side} px on the shorter side",
        )
    return ImageSet(folder, examples, ladder, skips)

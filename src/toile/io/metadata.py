"""Generation records in PNG files.

Two text chunks: ``toile`` holds the record as JSON (exact round trip), and ``parameters``
holds the same in AUTOMATIC1111's format, so A1111's PNG Info, Civitai and other readers show it.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from toile.errors import ImageInputError, one_line
from toile.result import ImageRecord

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

TOILE_KEY = "toile"
A1111_KEY = "parameters"


def a1111_parameters(record: ImageRecord) -> str:
    """Render a record in A1111's ``parameters`` layout (prompt, negative, key: value line)."""
    lines = [record.prompt]
    if record.negative_prompt:
        lines.append(f"Negative prompt: {record.negative_prompt}")
    items = [
        ("Steps", str(record.steps)),
        ("Sampler", record.sampler or "Default"),
    ]
    if record.schedule and record.schedule != "automatic":
        # A1111 1.9+ writes the schedule apart from the sampler, by its label.
        from toile.samplers import SCHEDULE_LABELS, Schedule

        items.append(("Schedule type", SCHEDULE_LABELS[Schedule(record.schedule)]))
    items += [
        ("CFG scale", f"{record.guidance:g}"),
        ("Seed", str(record.seed)),
        ("Size", f"{record.width}x{record.height}"),
        ("Model hash", record.model_hash[:10]),
        ("Model", record.model_id),
    ]
    if record.strength is not None and record.mode != "txt2img":
        items.append(("Denoising strength", f"{record.strength:g}"))
    if record.hires is not None:  # A1111's hires-fix keys
        hires = record.hires
        items += [("Denoising strength", f"{hires['strength']:g}"),
                  ("Hires upscale", f"{hires['scale']:g}"),
                  ("Hires steps", str(hires["steps"])),
                  ("Hires upscaler", hires["upscaler"])]
        if hires.get("sampler"):
            items.append(("Hires sampler", hires["sampler"]))
        if hires.get("prompt"):
            items.append(("Hires prompt", json.dumps(hires["prompt"])))
        if hires.get("negative_prompt"):
            items.append(("Hires negative prompt", json.dumps(hires["negative_prompt"])))
    if record.loras:
        # A1111 writes LoRAs as <lora:name:scale> in the prompt and hashes in "Lora hashes".
        hashes = ", ".join(f"{lora['name']}: {lora.get('hash', '')[:12]}" for lora in record.loras)
        items.append(("Lora hashes", f'"{hashes}"'))
    if record.refiner_id is not None:
        items.append(("Refiner", f"{record.refiner_id} [{(record.refiner_hash or '')[:10]}]"))
        items.append(("Refiner switch at", f"{record.refiner_switch:g}"))
    if record.tiling:
        items.append(("Tiling", "True"))  # as A1111 writes it
    items.append(("Version", f"toile {record.software.get('toile', '')}".strip()))
    lines.append(", ".join(f"{key}: {value}" for key, value in items))
    return "\n".join(lines)


def save_png(
    image: Image.Image,
    record: ImageRecord,
    path: str,
    *,
    finish: Callable[[bytes], bytes] | None = None,
) -> None:
    """Write ``image`` with its record (``toile`` JSON and A1111 ``parameters`` text chunks).
    ``finish`` gets the encoded PNG and returns the bytes to write: the safety layer's
    provenance (``toile.safety.provenance``: the IPTC label, C2PA signing) is its last change,
    so nothing may touch the bytes after it. Writes to a temp file first so no partial PNG is
    left."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(TOILE_KEY, record.to_json())
    info.add_text(A1111_KEY, a1111_parameters(record))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    data = finish(buffer.getvalue()) if finish is not None else buffer.getvalue()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_record(path: str) -> ImageRecord:
    """Read the ``toile`` record from a PNG written by :func:`save_png`."""
    from toile.io.images import open_image

    image = open_image(path, field="image")
    text = image.info.get(TOILE_KEY)
    if text is None:
        found = ", ".join(sorted(k for k in image.info if isinstance(image.info[k], str))) or "none"
        raise ImageInputError("image", f"{path} has no toile record (text chunks found: {found})")
    try:
        return ImageRecord.from_json(text)
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        # not JSON, not an object, fields missing or of the wrong kind: the file's, not ours
        raise ImageInputError(
            "image", f"{path} has a toile record that cannot be read: {one_line(exc)}"
        ) from None


def read_text_chunks(path: str) -> dict[str, str]:
    from toile.io.images import open_image

    image = open_image(path, field="image")
    return {k: v for k, v in image.info.items() if isinstance(v, str)}

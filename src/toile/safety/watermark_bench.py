"""How well the invisible watermark survives: ``python -m toile.safety.watermark_bench --n 100``.

Generates ``--n`` images with a model (toile's built-in ``toile-mini`` by default: a scene-world
prompt per batch of 10, seeds 0..n-1), or takes them from ``--images DIR``. Each run of
``--runs`` marks them with toile's message, at their own size (``native``; toile-mini draws
64x64) or first upscaled with Lanczos to SIZE x SIZE (256 and 512 by default: the package's
dwtDct is meant for 256x256 and up), in a :class:`~toile.safety.watermark.WatermarkMode`, saves
them as PNG and reads them back after each change:

- ``png``: the PNG as written (no change);
- ``jpeg-q90``, ``jpeg-q75``: saved as JPEG by Pillow at that quality (4:2:0 chroma);
- ``resize-0.75``: resized to 0.75x per side (Lanczos);
- ``crop-10%``: 10 % of the width and of the height cut away, half from each side.

The same images unmarked go through the same changes for the false-positive rate (``found`` on
an unmarked image).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from toile.safety.watermark import WatermarkResult


def _png(image: Image.Image) -> Image.Image:
    return _roundtrip(image, "PNG")


def _roundtrip(image: Image.Image, fmt: str, **options: Any) -> Image.Image:
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    buffer.seek(0)
    with Image.open(buffer) as reopened:
        return reopened.convert("RGB")


def _resize(image: Image.Image, factor: float) -> Image.Image:
    from PIL import Image

    w, h = image.size
    return image.resize((round(w * factor), round(h * factor)), Image.Resampling.LANCZOS)


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = image.size
    dx, dy = round(w * fraction / 2), round(h * fraction / 2)
    return image.crop((dx, dy, w - dx, h - dy))


CHANGES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "png": _png,
    "jpeg-q90": lambda im: _roundtrip(im, "JPEG", quality=90),
    "jpeg-q75": lambda im: _roundtrip(im, "JPEG", quality=75),
    "resize-0.75": lambda im: _resize(im, 0.75),
    "crop-10%": lambda im: _crop(im, 0.10),
}


def generate_images(
    n: int, model: str | None, steps: int | None, batch: int = 10
) -> list[Image.Image]:
    """``n`` images from ``model``, seeds 0..n-1: a scene-world prompt per ``batch`` images
    (a batch is several times faster per image than singles on a CPU)."""
    import toile
    from toile.data.scenes import caption, sample_scene

    generator = toile.load(model)
    images: list[Image.Image] = []
    while len(images) < n:
        rng = random.Random(len(images))
        prompt = caption(sample_scene(rng), rng)
        fields: dict[str, Any] = {"seed": len(images), "num_images": min(batch, n - len(images))}
        if steps is not None:
            fields["steps"] = steps
        images.extend(generator.generate(prompt, **fields).images)
        print(f"\rgenerated {len(images)}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return images


def load_images(folder: Path, n: int) -> list[Image.Image]:
    from toile.io.images import load_rgb

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    return [load_rgb(str(p)) for p in paths[:n]]


def _lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values 0..255."""
    import numpy as np

    c = rgb / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    to_xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    )
    xyz = c @ to_xyz.T / np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def visibility(original: Image.Image, marked: Image.Image) -> tuple[float, float]:
    """How much marking changed an image: PSNR (dB, RGB) and the mean CIE76 colour difference
    (dE; about 2.3 is a just-noticeable difference)."""
    import numpy as np

    a = np.asarray(original.convert("RGB"), dtype=np.float64)
    b = np.asarray(marked.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    psnr = 10 * np.log10(255**2 / mse) if mse > 0 else float("inf")
    delta_e = float(np.sqrt(((_lab(a) - _lab(b)) ** 2).sum(-1)).mean())
    return psnr, delta_e


def _summary(results: list[WatermarkResult]) -> dict[str, Any]:
    import statistics

    bits = [r.bits_matched for r in results]
    return {
        "too_small": sum(bool(r.reason) for r in results),
        "found": sum(r.found for r in results) / len(results),
        "bits_mean": round(statistics.fmean(bits), 2),
        "bits_min": min(bits),
        "bits_max": max(bits),
    }


def measure(images: list[Image.Image], size: int | None, mode: str) -> dict[str, Any]:
    """Detection rates (marked) and false-positive rates (unmarked) per change, with the images
    upscaled (Lanczos) to ``size`` x ``size``, or as they are when ``size`` is None."""
    from PIL import Image

    from toile.safety.watermark import WatermarkConfig, detect, embed

    config = WatermarkConfig(mode=mode)
    marked: dict[str, list[WatermarkResult]] = {name: [] for name in CHANGES}
    unmarked: dict[str, list[WatermarkResult]] = {name: [] for name in CHANGES}
    seconds = {"embed": 0.0, "detect": 0.0}
    psnr, delta_e = [], []
    for image in images:
        big = image.convert("RGB")
        if size is not None and big.size != (size, size):
            big = big.resize((size, size), Image.Resampling.LANCZOS)
        started = time.perf_counter()
        stored = _png(embed(big, config))  # what a user gets: the marked PNG
        seconds["embed"] += time.perf_counter() - started
        change_db, change_de = visibility(big, stored)
        psnr.append(change_db)
        delta_e.append(change_de)
        for name, change in CHANGES.items():
            changed = change(stored)
            started = time.perf_counter()
            marked[name].append(detect(changed))
            seconds["detect"] += time.perf_counter() - started
            unmarked[name].append(detect(change(big)))
    return {
        "size": "x".join(map(str, big.size)),
        "upscaled": size is not None and images[0].size != (size, size),
        "mode": mode,
        "marked": {name: _summary(rs) for name, rs in marked.items()},
        "unmarked": {name: _summary(rs) for name, rs in unmarked.items()},
        "psnr_db_mean": round(sum(psnr) / len(psnr), 2),
        "delta_e_mean": round(sum(delta_e) / len(delta_e), 2),
        "ms_per_image": {
            "embed": round(1000 * seconds["embed"] / len(images), 1),
            "detect": round(1000 * seconds["detect"] / (len(images) * len(CHANGES)), 1),
        },
    }


def table(report: dict[str, Any]) -> str:
    """The README's table: found rate (mean bits matched) on marked images, and the
    false-positive rate (most bits matched) on the same images unmarked."""
    lines = [
        "| size, mode | images | " + " | ".join(CHANGES) + " | PSNR, dE |",
        "|---|---|" + "---|" * (len(CHANGES) + 1),
    ]
    for run in report["runs"]:
        how = "upscaled" if run["upscaled"] else "as generated"
        label = f"{run['size']} ({how}), {run['mode']}"
        for kind, stat, fmt in (("marked", "bits_mean", "{:g}"), ("unmarked", "bits_max", "{}")):
            cells = [
                "too small to read"
                if run[kind][c]["too_small"] == report["n"]
                else f"{run[kind][c]['found']:.0%} ({fmt.format(run[kind][c][stat])})"
                for c in CHANGES
            ]
            change = f"{run['psnr_db_mean']:.1f} dB, {run['delta_e_mean']:.2f}"
            cells.append(change if kind == "marked" else "")
            lines.append(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toile.safety.watermark_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument("--model", default=None, help="model id or path (default: built-in)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per image")
    parser.add_argument("--batch", type=int, default=10, help="images per prompt (default 10)")
    parser.add_argument("--images", type=Path, default=None, help="take images from DIR instead")
    parser.add_argument(
        "--runs",
        default="native:robust,256:robust,512:robust,512:package",
        help="SIZE:MODE pairs to measure, SIZE 'native' for the images as they are "
        "(default native:robust,256:robust,512:robust,512:package)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--save", type=Path, default=None, help="save the images in DIR")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.images is not None:
        images = load_images(args.images, args.n)
        source = f"{len(images)} images from {args.images}"
    else:
        images = generate_images(args.n, args.model, args.steps, args.batch)
        model = args.model or "the built-in model"
        source = f"{len(images)} images from {model}, seeds 0-{len(images) - 1}"
    generated = time.perf_counter()
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(args.save / f"{i:04d}.png")
    report: dict[str, Any] = {"source": source, "n": len(images), "runs": []}
    for run in args.runs.split(","):
        size, _, mode = run.partition(":")
        side = None if size == "native" else int(size)
        report["runs"].append(measure(images, side, mode or "robust"))
    report["seconds"] = {
        "images": round(generated - started, 1),
        "measure": round(time.perf_counter() - generated, 1),
    }
    print(source)
    print(table(report))
    for run in report["runs"]:
        print(f"{run['size']} {run['mode']}: ms per image {run['ms_per_image']}")
    print(f"seconds: {report['seconds']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

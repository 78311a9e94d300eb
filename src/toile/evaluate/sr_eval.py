"""The super-resolution benchmark behind ``toile eval sr``: an SR stage against Lanczos and
bicubic resizing of the same 64² images.

For each scene the base is the renderer's 64² picture (or, with ``generated``, toile-mini's own
64² image for the scene's caption) and every method takes it to 256². Reported per method:

- **checker**: the scene checker's pass rate on the 256² image (an SR stage must neither
  invent nor lose objects);
- **psnr**: against the true 256² render (renders only);
- **edge width**: the mean 10-90 % transition width in pixels across object edges at 256²,
  along rows through single objects (the true render's is about 1 px; 4× Lanczos about 3-4);
- **sharpness**: no-reference, the RMS Sobel gradient of the image (Tenengrad's square
  root, 0-255 scale): the same edges spread over more pixels score lower. Beside the true
  render's.

Methods are any ``upscale(images, prompts) -> images`` callables, so this module never imports
the engine; ratios between methods on the same images are what to compare.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from toile.data.scenes import PALETTE, Scene, caption, render, sample_scene
from toile.evaluate.scene_checker import check

Upscale = Callable[[Sequence[Image.Image], Sequence[str]], list[Image.Image]]


def resize_method(filter_: Image.Resampling, factor: int = 4) -> Upscale:
    def upscale(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[Image.Image]:
        return [im.resize((im.width * factor, im.height * factor), filter_) for im in images]

    return upscale


@dataclass
class MethodScores:
    passed: int = 0
    total: int = 0
    psnr: list[float] = field(default_factory=list)
    edge_width: list[float] = field(default_factory=list)
    sharpness: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, float | int | None]:
        def mean(values: list[float]) -> float | None:
            return round(statistics.fmean(values), 3) if values else None

        return {"checker": round(self.passed / self.total, 3) if self.total else None,
                "n": self.total, "psnr": mean(self.psnr), "edge_width_px": mean(self.edge_width),
                "sharpness": mean(self.sharpness)}


def sharpness(image: Image.Image) -> float:
    """RMS Sobel gradient of the grey image (0-255 scale; the mean magnitude would not do: it
    is the image's total variation, the same for a blurred edge as for a sharp one)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    gx = (grey[1:-1, 2:] - grey[1:-1, :-2]) * 2 + (grey[:-2, 2:] - grey[:-2, :-2]) + (
        grey[2:, 2:] - grey[2:, :-2])
    gy = (grey[2:, 1:-1] - grey[:-2, 1:-1]) * 2 + (grey[2:, :-2] - grey[:-2, :-2]) + (
        grey[2:, 2:] - grey[:-2, 2:])
    return float(np.sqrt((gx ** 2 + gy ** 2).mean()) / 4)


def psnr(image: Image.Image, truth: Image.Image) -> float:
    error = np.mean((np.asarray(image, np.float32) - np.asarray(truth, np.float32)) ** 2)
    return float(10 * math.log10(255.0 ** 2 / max(error, 1e-10)))


def edge_width(image: Image.Image, truth: Image.Image, scene: Scene) -> float | None:
    """Mean 10-90 % transition width (px) at the left and right edges of a single object,
    over the rows through its middle half; None for other scenes."""
    if scene.kind != "single" or scene.background is None:
        return None
    bg = np.array(PALETTE[scene.background], np.float32)
    fg = np.array(PALETTE[scene.objects[0].color], np.float32)
    axis = fg - bg

    def level(pixels: np.ndarray) -> np.ndarray:  # 0 = background .. 1 = object colour
        return ((pixels - bg) @ axis) / float(axis @ axis)

    true_level = level(np.asarray(truth, np.float32)) > 0.5
    seen = level(np.asarray(image, np.float32))
    rows = np.nonzero(true_level.any(axis=1))[0]
    if len(rows) < 4:
        return None
    widths = []
    for y in rows[len(rows) // 4: 3 * len(rows) // 4]:
        inside = np.nonzero(true_level[y])[0]
        for x in (inside[0], inside[-1]):
            window = seen[y, max(0, x - 8): x + 9]
            widths.append(float(((window > 0.1) & (window < 0.9)).sum()))
    return statistics.fmean(widths) if widths else None


@dataclass
class SRReport:
    methods: dict[str, MethodScores]
    truth_sharpness: list[float] = field(default_factory=list)
    base_checker: MethodScores = field(default_factory=MethodScores)

    def to_dict(self) -> dict[str, object]:
        return {"methods": {k: v.to_dict() for k, v in self.methods.items()},
                "base_64_checker": self.base_checker.to_dict()["checker"],
                "true_render_sharpness": round(statistics.fmean(self.truth_sharpness), 3)
                if self.truth_sharpness else None}


def evaluate_sr(methods: dict[str, Upscale], n: int = 100, seed: int = 0,
                generate: Callable[[str, int], Image.Image] | None = None,
                progress: Callable[[int, int], None] | None = None) -> SRReport:
    """Grade each method on ``n`` scenes; with ``generate(prompt, seed)`` the 64² bases are
    generated images (no true 256² render: no PSNR or edge width), else renders."""
    report = SRReport({name: MethodScores() for name in methods})
    for i in range(n):
        rng = random.Random(f"sr-eval-{seed}-{i}")
        scene = sample_scene(rng)
        prompt = caption(scene, rng)
        layout_seed = rng.getrandbits(32)
        truth = None
        if generate is None:
            base = render(scene, 64, random.Random(layout_seed))
            truth = render(scene, 256, random.Random(layout_seed))
            report.truth_sharpness.append(sharpness(truth))
        else:
            base = generate(prompt, layout_seed)
        report.base_checker.passed += int(check(base, scene).passed)
        report.base_checker.total += 1
        for name, upscale in methods.items():
            (up,) = upscale([base], [prompt])
            scores = report.methods[name]
            scores.total += 1
            scores.passed += int(check(up, scene).passed)
            scores.sharpness.append(sharpness(up))
            if truth is not None:
                scores.psnr.append(psnr(up, truth))
                width = edge_width(up, truth, scene)
                if width is not None:
                    scores.edge_width.append(width)
        if progress:
            progress(i + 1, n)
    return report

"""Scene-world pictures drawn the way *other* renderers draw them.

:func:`toile.data.scenes.render` draws one canonical look (fixed palette, 64 px, fixed size
ranges), which is right for training a generator whose outputs the checker grades. A model that
*reads* pictures (captions, answers, edits) meets images from anywhere: any hue a person would
call "red", other canvas sizes, objects of 8-45 % of the canvas anywhere on it, soft or hard
edges, a little noise. This module draws that variety, reproducibly by seed, and keeps the
layout (each object's centre and extent) so text about positions can be written exactly.

Pillow (and numpy for the noise), like :mod:`toile.data.scenes`.
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

from PIL import Image, ImageDraw, ImageFilter

from toile.data.scenes import (
    ALL_COLORS,
    ALL_SHAPES,
    KINDS,
    MAX_COUNT,
    PALETTE,
    RELATIONS,
    SIZE_RANGES,
    Scene,
    SceneObject,
)

# The checker's split between "small" and "large" (extent as a fraction of the canvas side);
# sizes are drawn with a gap around it so that every label is unambiguous.
SIZE_SPLIT = (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0]) / 2
_SIZE_DRAW = MappingProxyType({"small": (0.09, SIZE_SPLIT - 0.03),
                               "large": (SIZE_SPLIT + 0.03, 0.45)})
_FREE_RANGE = (0.10, 0.34)  # relation objects
_COUNT_RANGE = (0.08, 0.22)  # count objects: four must fit apart

# Hue (degrees), saturation and value ranges a person would call each colour name. Centres only:
# borderline hues (red-orange, blue-purple) are left out so every label is one a person agrees
# with. White and black are any hue at low saturation.
_HSV = MappingProxyType({
    "red": ((-10.0, 6.0), (0.65, 1.0), (0.62, 1.0)),
    "orange": ((22.0, 36.0), (0.78, 1.0), (0.88, 1.0)),
    "yellow": ((49.0, 60.0), (0.65, 1.0), (0.88, 1.0)),
    "green": ((95.0, 145.0), (0.5, 1.0), (0.45, 0.9)),
    "blue": ((208.0, 234.0), (0.6, 1.0), (0.6, 1.0)),
    "purple": ((266.0, 288.0), (0.5, 0.85), (0.45, 0.8)),
    "pink": ((318.0, 340.0), (0.28, 0.55), (0.92, 1.0)),
    "white": ((0.0, 360.0), (0.0, 0.06), (0.92, 1.0)),
    "black": ((0.0, 360.0), (0.0, 0.3), (0.0, 0.14)),
})


@dataclass(frozen=True)
class Placement:
    """An object on the unit canvas: bounding-box centre ``(x, y)`` and ``extent`` (its longer
    side), all as fractions of the canvas side."""

    obj: SceneObject
    x: float
    y: float
    extent: float

    def pixels(self, size: int = 64) -> tuple[float, float, float]:
        """Centre and extent in pixels of a ``size`` canvas."""
        return self.x * size, self.y * size, self.extent * size


@dataclass(frozen=True)
class Look:
    """How a picture is drawn, apart from what it shows."""

    canvas: int  # side in pixels
    supersample: int  # 1 = hard, aliased edges; 4 = smooth
    colors: MappingProxyType[str, tuple[int, int, int]]
    blur: float  # Gaussian radius in pixels, 0 = none
    noise: float  # std of per-pixel noise, 0-255 scale


def color_variant(name: str, rng: random.Random) -> tuple[int, int, int]:
    """An RGB colour a person would call ``name``; the scene world's own palette 30 % of the
    time."""
    if rng.random() < 0.3:
        return PALETTE[name]
    (h0, h1), (s0, s1), (v0, v1) = _HSV[name]
    rgb = colorsys.hsv_to_rgb((rng.uniform(h0, h1) % 360) / 360, rng.uniform(s0, s1),
                              rng.uniform(v0, v1))
    return tuple(round(c * 255) for c in rgb)  # type: ignore[return-value]


def sample_look(rng: random.Random, names: Sequence[str]) -> Look:
    canvas = rng.choice((48, 64, 64, 64, 80, 96, 128, 160, 256))
    return Look(
        canvas=canvas,
        supersample=rng.choice((1, 2, 4, 4)),
        colors=MappingProxyType({n: color_variant(n, rng) for n in set(names)}),
        blur=rng.choice((0.0, 0.0, 0.0, 0.5, 1.0)) * canvas / 64,
        noise=rng.choice((0.0, 0.0, 2.0, 5.0)),
    )


def sample_any_scene(rng: random.Random, kinds: Sequence[str] = KINDS) -> Scene:
    """A scene over the whole vocabulary (held-out concepts included: readers should know
    every word the world has), with sizes stated for single objects only."""
    kind = rng.choice(tuple(kinds))
    background = rng.choice(ALL_COLORS)
    colors = [c for c in ALL_COLORS if c != background]
    if kind == "single":
        obj = SceneObject(rng.choice(ALL_SHAPES), rng.choice(colors), rng.choice(("small",
                                                                                   "large")))
        return Scene("single", background, (obj,))
    if kind == "count":
        obj = SceneObject(rng.choice(ALL_SHAPES), rng.choice(colors))
        return Scene("count", background, (obj,), count=rng.randint(2, MAX_COUNT))
    first = SceneObject(rng.choice(ALL_SHAPES), rng.choice(colors))
    while (second := SceneObject(rng.choice(ALL_SHAPES), rng.choice(colors))) == first:
        pass
    return Scene("relation", background, (first, second), relation=rng.choice(RELATIONS))


def layout(scene: Scene, rng: random.Random, tries: int = 400) -> list[Placement]:
    """Where each object goes, anywhere on the canvas (objects may touch the edge region but
    stay inside it). Relations hold with the dominant axis clear: the offset along the relation
    exceeds 1.5x the offset across it, and the two boxes do not overlap along it."""
    if scene.kind == "single":
        obj = scene.objects[0]
        extent = rng.uniform(*_SIZE_DRAW[obj.size or rng.choice(("small", "large"))])
        return [Placement(obj, _coord(extent, rng), _coord(extent, rng), extent)]
    if scene.kind == "relation":
        return _layout_relation(scene, rng, tries)
    return _layout_count(scene, rng, tries)


def _coord(extent: float, rng: random.Random) -> float:
    margin = extent / 2 + 0.01
    return rng.uniform(margin, 1 - margin)


def _layout_relation(scene: Scene, rng: random.Random, tries: int) -> list[Placement]:
    subject, reference = scene.objects
    for _ in range(tries):
        a = Placement(subject, 0, 0, rng.uniform(*_FREE_RANGE))
        b = Placement(reference, 0, 0, rng.uniform(*_FREE_RANGE))
        a = Placement(subject, _coord(a.extent, rng), _coord(a.extent, rng), a.extent)
        b = Placement(reference, _coord(b.extent, rng), _coord(b.extent, rng), b.extent)
        if relation_of(a, b) == scene.relation:
            return [a, b]
    raise RuntimeError(f"no layout found for {scene}")  # not reached for the drawn ranges


def relation_of(a: Placement, b: Placement) -> str | None:
    """The relation of ``a`` to ``b`` when it is clear (see :func:`layout`), else ``None``."""
    dx, dy = b.x - a.x, b.y - a.y
    half = (a.extent + b.extent) / 2
    if abs(dx) > 1.5 * abs(dy) and abs(dx) >= half + 0.02:
        return "left of" if dx > 0 else "right of"
    if abs(dy) > 1.5 * abs(dx) and abs(dy) >= half + 0.02:
        return "above" if dy > 0 else "below"
    return None


def _layout_count(scene: Scene, rng: random.Random, tries: int) -> list[Placement]:
    obj = scene.objects[0]
    base = rng.uniform(*_COUNT_RANGE)
    for _ in range(tries):
        placed: list[Placement] = []
        for _ in range(scene.count):
            extent = base * rng.uniform(0.92, 1.08)
            candidate = Placement(obj, _coord(extent, rng), _coord(extent, rng), extent)
            if any(not _apart(candidate, other) for other in placed):
                break
            placed.append(candidate)
        if len(placed) == scene.count:
            return placed
    raise RuntimeError(f"no layout found for {scene}")  # not reached for the drawn ranges


def _apart(a: Placement, b: Placement, gap: float = 0.03) -> bool:
    half = (a.extent + b.extent) / 2
    return max(abs(a.x - b.x), abs(a.y - b.y)) - half >= gap


def draw(placements: Sequence[Placement], background: str, look: Look,
         rng: random.Random) -> Image.Image:
    """The picture, ``look.canvas`` pixels square."""
    scale = look.canvas * look.supersample
    image = Image.new("RGB", (scale, scale), look.colors[background])
    pen = ImageDraw.Draw(image)
    for item in placements:
        _draw_shape(pen, item, scale, look.colors[item.obj.color])
    if look.supersample > 1:
        image = image.reduce(look.supersample)
    if look.blur:
        image = image.filter(ImageFilter.GaussianBlur(look.blur))
    if look.noise:
        image = _add_noise(image, look.noise, rng)
    return image


def _add_noise(image: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    import numpy as np  # seeded from ``rng`` (Pillow's effect_noise cannot be seeded)

    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, sigma, (*image.size[::-1], 3))
    pixels = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))


def _draw_shape(pen: ImageDraw.ImageDraw, item: Placement, scale: int,
                fill: tuple[int, int, int]) -> None:
    cx, cy, half = item.x * scale, item.y * scale, item.extent * scale / 2
    if item.obj.shape == "circle":
        pen.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif item.obj.shape == "square":
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif item.obj.shape == "triangle":
        h = half * math.sqrt(3)  # equilateral, apex up, box centred: width 2*half, height h
        pen.polygon([(cx, cy - h / 2), (cx + half, cy + h / 2), (cx - half, cy + h / 2)],
                    fill=fill)
    else:
        pen.polygon(_star(cx, cy, half), fill=fill)


def _star(cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    outer = half / math.sin(math.radians(72))
    inner = outer * 0.42
    cy += outer * (1 - math.cos(math.radians(36))) / 2
    return [(cx + (outer if i % 2 == 0 else inner) * math.cos(math.radians(-90 + 36 * i)),
             cy + (outer if i % 2 == 0 else inner) * math.sin(math.radians(-90 + 36 * i)))
            for i in range(10)]


@dataclass(frozen=True)
class VariedPicture:
    """A drawn scene with its layout and look."""

    scene: Scene
    placements: tuple[Placement, ...]
    look: Look
    image: Image.Image


def varied_picture(rng: random.Random, scene: Scene | None = None,
                   kinds: Sequence[str] = KINDS) -> VariedPicture:
    """A random scene (or ``scene``) drawn with a random look; deterministic for ``rng``."""
    scene = scene or sample_any_scene(rng, kinds)
    assert scene.background is not None
    placements = tuple(layout(scene, rng))
    look = sample_look(rng, [scene.background, *(o.color for o in scene.objects)])
    return VariedPicture(scene, placements, look, draw(placements, scene.background, look, rng))

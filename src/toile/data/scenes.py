"""The scene world: a procedural grammar of coloured shapes, its renderer and captions.

toile's own models train on (image, caption) pairs drawn from this world, and the scene checker
(:mod:`toile.evaluate.scene_checker`) grades generated images against the same grammar, so a
prompt from this world has an exact right answer (the GenEval idea, in a world small enough to
check with a few lines of numpy).

A scene is one of three kinds:

* ``"single"``   -- one object: ``a small red circle on a blue background``;
* ``"relation"`` -- two different objects, ``objects[0] RELATION objects[1]``:
  ``a red square to the left of a green circle on white``;
* ``"count"``    -- ``count`` (2-4) identical copies of ``objects[0]``:
  ``three yellow triangles on a black background``.

``Scene.count`` is the number of copies of *each* listed object (1 for single and relation).

Unstated fields are ``None`` and mean "free": the renderer chooses them at random and the checker
does not grade them. Sampled scenes state the size of a single object and leave the sizes of
relation and count objects free (they are never written in their captions); parsed user prompts
may also leave the background free. So ``parse_prompt(caption(scene, rng, p)) == scene`` holds
exactly for every scene :func:`sample_scene` makes, with either phrasing (the parser is
:mod:`toile.data.scene_parser`).

Held-out concepts (the colour ``pink`` and the shape ``star``) never appear in scenes sampled
with the defaults; the renderer, captions, parser and checker all handle them, so fine-tuning can
be shown to teach them.

This module is pure Python + Pillow (no torch, no numpy) so data loading stays cheap.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

from PIL import Image, ImageDraw

from toile.errors import RequestError

# --- vocabulary ------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
HELD_OUT_SHAPES = frozenset({"star"})
ALL_SHAPES: tuple[str, ...] = (*SHAPES, "star")

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
HELD_OUT_COLORS = frozenset({"pink"})
ALL_COLORS: tuple[str, ...] = (*COLORS, "pink")

# Chosen far apart in RGB (closest pair: orange/yellow, 108 apart) so that the checker can
# classify by nearest colour with a wide tolerance. Pink sits away from red, purple and white.
PALETTE: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (215, 25, 30),
        "orange": (250, 135, 0),
        "yellow": (250, 235, 40),
        "green": (30, 165, 60),
        "blue": (30, 75, 225),
        "purple": (130, 40, 185),
        "white": (245, 245, 245),
        "black": (15, 15, 15),
        "pink": (255, 125, 200),
    }
)

SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single", "relation", "count")
PHRASINGS: tuple[str, ...] = ("train", "heldout")
COUNT_WORDS: MappingProxyType[int, str] = MappingProxyType(
    {1: "one", 2: "two", 3: "three", 4: "four"}
)
MAX_COUNT = 4

# Object extents (the longer side of the bounding box) as fractions of the canvas: 12-16 px and
# 22-28 px at 64 px. The gap between the two lets the checker grade size with one threshold.
SIZE_RANGES: MappingProxyType[str, tuple[float, float]] = MappingProxyType(
    {"small": (12 / 64, 16 / 64), "large": (22 / 64, 28 / 64)}
)
# Free sizes: relation objects span both classes; count objects stay small so four fit apart.
_FREE_RELATION_RANGE = (12 / 64, 22 / 64)
_FREE_COUNT_RANGE = SIZE_RANGES["small"]
_BORDER = 3 / 64  # clear border, so the checker can read the background from the edge pixels
_GAP = 4 / 64  # minimum empty space between two objects' bounding boxes
_SUPERSAMPLE = 4
MIN_RENDER_SIZE = 16
MAX_RENDER_SIZE = 2048


# --- types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One kind of object. ``size`` is ``"small"``, ``"large"`` or ``None`` (free, not graded)."""

    shape: str
    color: str
    size: str | None = None

    def __post_init__(self) -> None:
        _require_member("shape", self.shape, ALL_SHAPES)
        _require_member("color", self.color, ALL_COLORS)
        if self.size is not None:
            _require_member("size", self.size, SIZES)

    @property
    def uses_held_out(self) -> bool:
        return self.shape in HELD_OUT_SHAPES or self.color in HELD_OUT_COLORS


@dataclass(frozen=True)
class Scene:
    """A scene of the world; see the module docstring for the three kinds.

    ``background`` is ``None`` only for parsed prompts that do not name one (not graded).
    """

    kind: str
    background: str | None
    objects: tuple[SceneObject, ...]
    relation: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        _require_member("kind", self.kind, KINDS)
        if self.background is not None:
            _require_member("background", self.background, ALL_COLORS)
        if not isinstance(self.objects, tuple):
            raise RequestError("objects", "must be a tuple of SceneObject")
        expected = 2 if self.kind == "relation" else 1
        if len(self.objects) != expected:
            raise RequestError(
                "objects", f"a {self.kind} scene has {expected}, got {len(self.objects)}"
            )
        self._check_kind_fields()
        for obj in self.objects:
            if obj.color == self.background:
                raise RequestError("objects", f"colour {obj.color!r} equals the background")

    def _check_kind_fields(self) -> None:
        if self.kind == "relation":
            _require_member("relation", self.relation, RELATIONS)
            first, second = self.objects
            if (first.shape, first.color) == (second.shape, second.color):
                raise RequestError("objects", "a relation needs two different objects")
        elif self.relation is not None:
            raise RequestError("relation", f"must be None for a {self.kind} scene")
        low, high = (2, MAX_COUNT) if self.kind == "count" else (1, 1)
        if not low <= self.count <= high:
            raise RequestError("count", f"must be in {low}..{high} for a {self.kind} scene")

    @property
    def uses_held_out(self) -> bool:
        """True when the scene contains a held-out colour or shape (background included)."""
        return self.background in HELD_OUT_COLORS or any(o.uses_held_out for o in self.objects)


def _require_member(field: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise RequestError(field, f"must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_phrasing(phrasing: str) -> None:
    _require_member("phrasing", phrasing, PHRASINGS)


# --- sampling --------------------------------------------------------------------------------


def sample_scene(
    rng: random.Random,
    *,
    kinds: Sequence[str] = KINDS,
    allow_held_out: bool = False,
    require_held_out: bool = False,
) -> Scene:
    """Draw a scene, deterministic for the state of ``rng``.

    With the defaults no held-out concept (pink, star) appears, background included.
    ``require_held_out`` (which implies ``allow_held_out``) redraws until the scene uses one,
    for fine-tuning data and the held-out prompt set.
    """
    if not kinds:
        raise RequestError("kinds", f"must name at least one of {', '.join(KINDS)}")
    for kind in kinds:
        _require_member("kinds", kind, KINDS)
    allow_held_out = allow_held_out or require_held_out
    while True:
        scene = _draw_scene(rng, rng.choice(tuple(kinds)), allow_held_out)
        if not require_held_out or scene.uses_held_out:
            return scene


def _draw_scene(rng: random.Random, kind: str, allow_held_out: bool) -> Scene:
    shapes = ALL_SHAPES if allow_held_out else SHAPES
    colors = ALL_COLORS if allow_held_out else COLORS
    background = rng.choice(colors)
    object_colors = [c for c in colors if c != background]
    if kind == "single":
        obj = SceneObject(rng.choice(shapes), rng.choice(object_colors), rng.choice(SIZES))
        return Scene("single", background, (obj,))
    if kind == "count":
        obj = SceneObject(rng.choice(shapes), rng.choice(object_colors))
        return Scene("count", background, (obj,), count=rng.randint(2, MAX_COUNT))
    first = SceneObject(rng.choice(shapes), rng.choice(object_colors))
    while True:
        second = SceneObject(rng.choice(shapes), rng.choice(object_colors))
        if second != first:
            break
    return Scene("relation", background, (first, second), relation=rng.choice(RELATIONS))


# --- rendering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placed:
    """An object placed on the unit canvas: centre of its bounding box and its extent."""

    obj: SceneObject
    x: float
    y: float
    extent: float


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image.

    Positions and sizes are drawn from ``rng`` (``None`` means a fixed ``Random(0)``, so a scene
    renders the same way every time). Free fields are chosen here: a free background avoids the
    object colours. Everything is laid out in canvas fractions, so any size gives the same
    picture; shapes are drawn at 4x and box-filtered down for clean anti-aliased edges.
    """
    if not isinstance(size, int) or not MIN_RENDER_SIZE <= size <= MAX_RENDER_SIZE:
        raise RequestError(
            "size", f"must be an int in {MIN_RENDER_SIZE}..{MAX_RENDER_SIZE}; got {size!r}"
        )
    rng = random.Random(0) if rng is None else rng
    background = scene.background or _free_background(scene, rng)
    return _draw(_layout(scene, rng), background, size)


def _free_background(scene: Scene, rng: random.Random) -> str:
    used = {o.color for o in scene.objects}
    return rng.choice([c for c in COLORS if c not in used])


def _extent(obj: SceneObject, free_range: tuple[float, float], rng: random.Random) -> float:
    low, high = SIZE_RANGES[obj.size] if obj.size else free_range
    return rng.uniform(low, high)


def _centre(extent: float, rng: random.Random) -> float:
    return rng.uniform(_BORDER + extent / 2, 1 - _BORDER - extent / 2)


def _layout(scene: Scene, rng: random.Random) -> list[_Placed]:
    if scene.kind == "single":
        obj = scene.objects[0]
        extent = _extent(obj, rng.choice(tuple(SIZE_RANGES.values())), rng)
        return [_Placed(obj, _centre(extent, rng), _centre(extent, rng), extent)]
    if scene.kind == "relation":
        return _layout_relation(scene, rng)
    return _layout_count(scene, rng)


def _layout_relation(scene: Scene, rng: random.Random, tries: int = 500) -> list[_Placed]:
    """Place the pair so the relation holds with a wide margin along its axis and the offset
    across it stays small (at most 0.35 of the distance along), so "left of" never reads as
    "above" and the checker's margin is always met."""
    subject, reference = scene.objects
    horizontal = scene.relation in ("left of", "right of")
    subject_first = scene.relation in ("left of", "above")
    for _ in range(tries):
        e_sub = _extent(subject, _FREE_RELATION_RANGE, rng)
        e_ref = _extent(reference, _FREE_RELATION_RANGE, rng)
        e_lo, e_hi = (e_sub, e_ref) if subject_first else (e_ref, e_sub)
        along_lo, along_hi = _centre(e_lo, rng), _centre(e_hi, rng)
        across_lo, across_hi = _centre(e_lo, rng), _centre(e_hi, rng)
        distance = along_hi - along_lo
        if distance >= (e_lo + e_hi) / 2 + _GAP and abs(across_hi - across_lo) <= 0.35 * distance:
            break
    else:  # only reachable for very large stated sizes: fall back to the smallest allowed
        e_sub, e_ref = (
            SIZE_RANGES[o.size][0] if o.size else _FREE_RELATION_RANGE[0] for o in scene.objects
        )
        e_lo, e_hi = (e_sub, e_ref) if subject_first else (e_ref, e_sub)
        along_lo, along_hi, across_lo, across_hi = 0.27, 0.73, 0.5, 0.5
    lo = (along_lo, across_lo) if horizontal else (across_lo, along_lo)
    hi = (along_hi, across_hi) if horizontal else (across_hi, along_hi)
    first = _Placed(subject if subject_first else reference, *lo, e_lo)
    second = _Placed(reference if subject_first else subject, *hi, e_hi)
    return [first, second] if subject_first else [second, first]


def _apart(a: _Placed, b: _Placed) -> bool:
    """Bounding boxes separated by at least the gap along some axis."""
    half = (a.extent + b.extent) / 2
    return max(abs(a.x - b.x), abs(a.y - b.y)) - half >= _GAP


def _layout_count(scene: Scene, rng: random.Random, tries: int = 200) -> list[_Placed]:
    """Identical objects (size jitter below 1 px at 64) placed by rejection, well apart."""
    obj = scene.objects[0]
    base = _extent(obj, _FREE_COUNT_RANGE, rng)
    for _ in range(tries):
        placed: list[_Placed] = []
        for _ in range(scene.count):
            extent = base * rng.uniform(0.95, 1.05)
            candidate = _Placed(obj, _centre(extent, rng), _centre(extent, rng), extent)
            if not all(_apart(candidate, other) for other in placed):
                break
            placed.append(candidate)
        if len(placed) == scene.count:
            return placed
    cells = [(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)]
    rng.shuffle(cells)
    extent = min(base, 0.4)
    return [_Placed(obj, x, y, extent) for x, y in cells[: scene.count]]


def _draw(placed: list[_Placed], background: str, size: int) -> Image.Image:
    scale = size * _SUPERSAMPLE
    image = Image.new("RGB", (scale, scale), PALETTE[background])
    draw = ImageDraw.Draw(image)
    for item in placed:
        _draw_shape(draw, item, scale)
    return image.reduce(_SUPERSAMPLE)  # box filter: exact area coverage, no ringing


def _draw_shape(draw: ImageDraw.ImageDraw, item: _Placed, scale: int) -> None:
    fill = PALETTE[item.obj.color]
    cx, cy, half = item.x * scale, item.y * scale, item.extent * scale / 2
    shape = item.obj.shape
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        h = half * math.sqrt(3)  # equilateral, apex up, bounding box centred on (cx, cy)
        draw.polygon(
            [(cx, cy - h / 2), (cx + half, cy + h / 2), (cx - half, cy + h / 2)], fill=fill
        )
    else:
        draw.polygon(_star_points(cx, cy, half), fill=fill)


def _star_points(cx: float, cy: float, half_width: float) -> list[tuple[float, float]]:
    """Five-point star, point up, scaled so its bounding box is 2*half_width wide and centred."""
    outer = half_width / math.sin(math.radians(72))
    inner = outer * 0.42  # a little fatter than a regular pentagram: tips survive at 12 px
    cy += outer * (1 - math.cos(math.radians(36))) / 2  # centre the box, not the star
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else inner
        angle = math.radians(-90 + 36 * i)
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


# --- captions --------------------------------------------------------------------------------

# Slots: {obj} object phrase with its size, {a}/{b} relation subject/reference, {rel} relation
# phrase, {inv} the relation said from the reference's side ("to its left"), {n} number word,
# {d} digit, {objs} plural object phrase, {bg} background colour. Templates stay unambiguous for
# parse_prompt; the held-out sets use structures and words the training sets never do.
_TEMPLATES: MappingProxyType[str, MappingProxyType[str, tuple[str, ...]]] = MappingProxyType(
    {
        "train": MappingProxyType(
            {
                "single": (
                    "a {obj} on a {bg} background",
                    "a {bg} background with a {obj} in it",
                    "{obj}, {bg} backdrop",
                    "a {obj} on {bg}",
                    "one {obj} against a {bg} background",
                    "a picture of a {obj} on a {bg} background",
                    "{bg} background, {obj}",
                    "an image with a {obj} on {bg}",
                    "a single {obj} on a {bg} backdrop",
                ),
                "relation": (
                    "a {a} {rel} a {b} on a {bg} background",
                    "a {bg} background with a {a} {rel} a {b}",
                    "{a} {rel} {b}, {bg} backdrop",
                    "a {a} {rel} a {b} on {bg}",
                    "a {b} with a {a} {inv}, on a {bg} background",
                    "an image of a {a} {rel} a {b} against a {bg} background",
                    "{bg} background: a {a} {rel} a {b}",
                    "there is a {a} {rel} a {b} on a {bg} background",
                    "a {a} placed {rel} a {b}, {bg} background",
                ),
                "count": (
                    "{n} {objs} on a {bg} background",
                    "a {bg} background with {n} {objs}",
                    "{n} {objs}, {bg} backdrop",
                    "{n} {objs} on {bg}",
                    "a picture of {n} {objs} against a {bg} background",
                    "{bg} background, {n} {objs}",
                    "there are {n} {objs} on a {bg} background",
                    "{d} {objs} on a {bg} background",
                    "a group of {n} {objs} on {bg}",
                ),
            }
        ),
        "heldout": MappingProxyType(
            {
                "single": (
                    "on a {bg} field there is a {obj}",
                    "a {bg} canvas containing one {obj}",
                    "just a {obj}, set against {bg}",
                    "a {size} {shape} in {color}, on a {bg} background",
                    "the background is {bg} and there is a {obj} on it",
                ),
                "relation": (
                    "on a {bg} field, the {a} is {rel} the {b}",
                    "a {bg} canvas showing a {a} {rel} a {b}",
                    "a {b}, and {inv} a {a}, set against {bg}",
                    "the scene has a {a} sitting {rel} a {b}; the background is {bg}",
                ),
                "count": (
                    "exactly {n} {objs}, set against {bg}",
                    "on a {bg} field, {d} {objs}",
                    "{objs}, {n} of them, on a {bg} background",
                    "a {bg} canvas showing {n} {objs}",
                ),
            }
        ),
    }
)

# How each relation is said: from the subject's side ("A left of B") and from the reference's
# side ("B with A to its left"). Held-out phrasing also uses words training never does.
_RELATION_WORDS = MappingProxyType(
    {
        "train": MappingProxyType(
            {
                "left of": (("to the left of", "left of"), ("to its left",)),
                "right of": (("to the right of", "right of"), ("to its right",)),
                "above": (("above",), ("above it",)),
                "below": (("below", "under"), ("below it", "under it")),
            }
        ),
        "heldout": MappingProxyType(
            {
                "left of": (("on the left side of",), ("on its left side",)),
                "right of": (("on the right side of",), ("on its right side",)),
                "above": (("over",), ("over it",)),
                "below": (("beneath", "underneath"), ("beneath it",)),
            }
        ),
    }
)


def templates(phrasing: str, kind: str) -> tuple[str, ...]:
    """The caption templates of one phrasing set and scene kind (for tests and reports)."""
    _check_phrasing(phrasing)
    _require_member("kind", kind, KINDS)
    return _TEMPLATES[phrasing][kind]


def caption(scene: Scene, rng: random.Random, phrasing: str = "train") -> str:
    """Describe ``scene`` in words, with a template and word choices drawn from ``rng``.

    ``phrasing="train"`` draws from the training templates, ``"heldout"`` from a disjoint set
    used only to measure how well a model generalises to unseen wording. Every stated field of
    the scene (and nothing else) is in the caption, so ``scene_parser.parse_prompt``
    inverts it.
    """
    _check_phrasing(phrasing)
    if scene.background is None:
        raise RequestError("scene.background", "a caption needs a background colour")
    template = rng.choice(_TEMPLATES[phrasing][scene.kind])
    slots = {"bg": scene.background, "d": str(scene.count), "n": COUNT_WORDS[scene.count]}
    first = scene.objects[0]
    slots |= {"obj": _phrase(first), "objs": _phrase(first, plural=True)}
    slots |= {"size": first.size or "", "shape": first.shape, "color": first.color}
    if scene.kind == "relation":
        direct, inverse = _RELATION_WORDS[phrasing][scene.relation]
        slots |= {"a": _phrase(first), "b": _phrase(scene.objects[1])}
        slots |= {"rel": rng.choice(direct), "inv": rng.choice(inverse)}
    return _tidy(template.format(**slots))


def _phrase(obj: SceneObject, plural: bool = False) -> str:
    return " ".join(w for w in (obj.size, obj.color, obj.shape + ("s" if plural else "")) if w)


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


# --- pairs -----------------------------------------------------------------------------------


def generate_pair(
    rng: random.Random,
    size: int = 64,
    *,
    allow_held_out: bool = False,
    phrasing: str = "train",
    kinds: Sequence[str] = KINDS,
) -> tuple[Image.Image, str, Scene]:
    """One training example (image, caption, scene), deterministic for the state of ``rng``."""
    _check_phrasing(phrasing)
    scene = sample_scene(rng, kinds=kinds, allow_held_out=allow_held_out)
    text = caption(scene, rng, phrasing)
    return render(scene, size, rng), text, scene

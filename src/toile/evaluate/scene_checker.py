"""An exact grader for the scene world: does an image show the scene its prompt asks for?

GenEval grades text-to-image models with an object detector; in the scene world the objects are
flat-coloured shapes on a flat background, so plain image analysis finds them exactly and needs
no learned model (nothing to download, nothing that could itself be wrong in a learned way):

1. Work at 64 x 64 (box-filtered down, or interpolated up), where all thresholds are set.
2. Background: the most common palette colour among the border pixels (renders keep a clear
   border); its RGB value is the median of those pixels.
3. Foreground: pixels far from the background colour; connected components (8-neighbour, a
   small vectorised label propagation: scipy is not a dependency); specks are dropped.
4. Each component's colour: median of its most saturated pixels, nearest palette colour, or
   unrecognised when too far from all of them. Its exact outline: pixels at least half-way from
   the background to that colour, so anti-aliased edges count as in a 50 % coverage render.
5. Shape from scale-free features of the outline (see :class:`ShapeFeatures`): fill (area /
   bounding box) tells convex round or square shapes (>= 0.7) from pointed ones (<= 0.64);
   filled bounding-box corners tell squares from circles (a pixelated 12 px circle is an
   octagon with fill up to 0.9); solidity (area / convex hull) tells stars (~0.6) from
   triangles (~0.87). Size from the longer side of the bounding box.
6. Relations from centroids: along the relation's axis by at least ``RELATION_MARGIN`` of the
   image, and more along that axis than across it ("left of" is not "above").

Grading is strict, as a user would judge: exactly the asked-for objects, ``count`` times each,
and nothing else. An aspect that applies but cannot be verified (a relation between objects
that are not there, the size of a missing object) fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

from toile.data.scenes import ALL_COLORS, PALETTE, SIZE_RANGES, Scene, SceneObject

WORK_SIZE = 64
RELATION_MARGIN = 0.08  # fraction of the image, about 5 px at 64
_BORDER = 2  # px of the work image read as background
_FOREGROUND_DISTANCE = 48.0  # RGB distance from the background that makes a pixel foreground
_MIN_AREA = 12  # px at 64; the smallest star rendered covers about 45
_COLOR_TOLERANCE = 80.0  # palette colours are >= 108 apart; beyond this: unrecognised
# Halfway between the largest small (16 px) and the smallest large (22 px) object at 64.
_SIZE_SPLIT = (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0]) / 2
# Shape thresholds, set between the 1st and 99th percentiles of the features measured on renders
# at 64-256 px, clean, with Gaussian noise (sigma 10-20) and with a 0.7 px blur. Fill: circle
# and square >= 0.70, triangle <= 0.64, star <= 0.57; solidity: star <= 0.73, triangle >= 0.77;
# corners: circle <= 0.34, square >= 0.62 (0.92 clean). Pixelated 12 px circles are octagons
# with fill up to 0.9, so fill alone cannot tell them from squares; the corners can.
_CONVEX_MIN_FILL = 0.665
_SQUARE_MIN_CORNERS = 0.5
_STAR_MAX_SOLIDITY = 0.76


@dataclass(frozen=True)
class Blob:
    """One object found in an image. Position and area are fractions of the image."""

    color: str | None  # None: not close to any palette colour
    shape: str
    size: str
    x: float
    y: float
    area: float

    def describe(self) -> str:
        return f"{self.size} {self.color or 'unrecognised-colour'} {self.shape}"


@dataclass(frozen=True)
class Detection:
    """What the checker sees in an image: the background colour and the objects."""

    background: str | None
    objects: tuple[Blob, ...]


@dataclass(frozen=True)
class SceneCheck:
    """The verdict for one image. ``passed`` is true when every aspect is; ``reason`` says what
    went wrong (empty when passed). ``size_ok`` only grades sizes the scene states."""

    background_ok: bool
    objects_ok: bool
    count_ok: bool
    relation_ok: bool
    size_ok: bool = True
    reason: str = ""
    detection: Detection | None = None
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        aspects = (self.background_ok, self.objects_ok, self.count_ok, self.relation_ok)
        object.__setattr__(self, "passed", all(aspects) and self.size_ok)


def check(image: Image.Image, scene: Scene) -> SceneCheck:
    """Grade ``image`` (any size, any mode) against ``scene``."""
    return grade(detect(image), scene)


def detect(image: Image.Image) -> Detection:
    """Find the background colour and the objects of a scene-world image."""
    pixels = _work_pixels(image)
    background_rgb, background = _background(pixels)
    return Detection(background, tuple(_find_blobs(pixels, background_rgb)))


# --- image analysis --------------------------------------------------------------------------


def _work_pixels(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (WORK_SIZE, WORK_SIZE):
        shrinking = min(image.size) >= WORK_SIZE
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
        image = image.resize((WORK_SIZE, WORK_SIZE), resample)
    return np.asarray(image, dtype=np.float32)


_PALETTE_RGB = np.array([PALETTE[c] for c in ALL_COLORS], dtype=np.float32)


def _nearest_colors(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour and the distance to it, for (..., 3) arrays."""
    distances = np.linalg.norm(rgb[..., None, :] - _PALETTE_RGB, axis=-1)
    return distances.argmin(axis=-1), distances.min(axis=-1)


def _color_name(rgb: np.ndarray) -> str | None:
    index, distance = _nearest_colors(rgb)
    return ALL_COLORS[int(index)] if distance <= _COLOR_TOLERANCE else None


def _background(pixels: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Most common palette colour on the border; its actual RGB is the median of its pixels."""
    ring = np.ones(pixels.shape[:2], dtype=bool)
    ring[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
    border = pixels[ring]
    nearest, _ = _nearest_colors(border)
    majority = np.bincount(nearest, minlength=len(ALL_COLORS)).argmax()
    rgb = np.median(border[nearest == majority], axis=0)
    return rgb, _color_name(rgb)


def _find_blobs(pixels: np.ndarray, background: np.ndarray) -> list[Blob]:
    distance = np.linalg.norm(pixels - background, axis=-1)
    labels = _label(distance > _FOREGROUND_DISTANCE)
    blobs = []
    for component in range(labels.max() + 1):
        mask = labels == component
        if mask.sum() >= _MIN_AREA:
            blob = _describe_component(pixels, background, distance, mask)
            if blob is not None:
                blobs.append(blob)
    return blobs


def _label(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels 0..n-1 (-1 outside the mask).

    Each pixel repeatedly takes the smallest label among its neighbours and then its label's
    label (pointer jumping), so it converges in a few dozen vectorised steps at 64 x 64.
    """
    height, width = mask.shape
    outside = height * width
    labels = np.where(mask, np.arange(outside).reshape(mask.shape), outside)
    while True:
        padded = np.pad(labels, 1, constant_values=outside)
        smallest = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(smallest, padded[dy : dy + height, dx : dx + width], out=smallest)
        smallest[~mask] = outside
        flat = smallest.ravel()
        inside = flat < outside
        flat[inside] = flat[flat[inside]]
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    result = np.full(mask.shape, -1)
    result[mask] = np.unique(labels[mask], return_inverse=True)[1]
    return result


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


def _describe_component(
    pixels: np.ndarray, background: np.ndarray, distance: np.ndarray, mask: np.ndarray
) -> Blob | None:
    core = mask & (distance >= 0.7 * distance[mask].max())  # skip anti-aliased edge pixels
    rgb = np.median(pixels[core], axis=0)
    direction = rgb - background
    coverage = (pixels - background) @ direction / max(float(direction @ direction), 1e-6)
    outline = _dilate(mask) & (coverage > 0.5)
    if outline.sum() < _MIN_AREA:
        return None
    ys, xs = np.nonzero(outline)
    extent = max(np.ptp(xs), np.ptp(ys)) + 1
    return Blob(
        color=_color_name(rgb),
        shape=_classify_shape(outline),
        size="small" if extent / WORK_SIZE < _SIZE_SPLIT else "large",
        x=float(xs.mean() + 0.5) / WORK_SIZE,
        y=float(ys.mean() + 0.5) / WORK_SIZE,
        area=float(outline.sum()) / WORK_SIZE**2,
    )


class ShapeFeatures(NamedTuple):
    """Scale-free features of an outline: fill and solidity are unchanged by stretching either
    axis and the corners nearly so, so none depends on the image size or aspect."""

    fill: float  # area / bounding box
    solidity: float  # area / convex hull
    corners: float  # filled share of the four corner patches of the bounding box


def shape_features(outline: np.ndarray) -> ShapeFeatures:
    """Features of a boolean outline (see :class:`ShapeFeatures`)."""
    rows = np.nonzero(outline.any(axis=1))[0]
    cols = np.nonzero(outline.any(axis=0))[0]
    box = outline[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    area = float(box.sum())
    k = max(2, round(0.2 * min(box.shape)))
    patches = (box[:k, :k], box[:k, -k:], box[-k:, :k], box[-k:, -k:])
    return ShapeFeatures(
        fill=area / box.size,
        solidity=area / _hull_area(outline, rows),
        corners=float(np.mean([p.mean() for p in patches])),
    )


def _hull_area(outline: np.ndarray, rows: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares (their corners at each row's two ends)."""
    width = outline.shape[1]
    left = outline[rows].argmax(axis=1)
    right = width - outline[rows, ::-1].argmax(axis=1)
    corners: set[tuple[float, float]] = set()
    for row, lo, hi in zip(rows.tolist(), left.tolist(), right.tolist(), strict=True):
        corners |= {(lo, row), (hi, row), (lo, row + 1), (hi, row + 1)}
    hull = _monotone_chain(sorted(corners))
    pairs = zip(hull, hull[1:] + hull[:1], strict=True)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in pairs))


def _monotone_chain(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return half(points) + half(points[::-1])


def _classify_shape(outline: np.ndarray) -> str:
    features = shape_features(outline)
    if features.fill >= _CONVEX_MIN_FILL:
        return "square" if features.corners >= _SQUARE_MIN_CORNERS else "circle"
    return "star" if features.solidity <= _STAR_MAX_SOLIDITY else "triangle"


# --- grading ---------------------------------------------------------------------------------


def grade(detection: Detection, scene: Scene) -> SceneCheck:
    """Compare what was detected with what the scene asks for."""
    problems: list[str] = []
    background_ok = scene.background is None or detection.background == scene.background
    if not background_ok:
        problems.append(
            f"background is {detection.background or 'unrecognised'}, not {scene.background}"
        )
    matches = [_matching(detection.objects, obj) for obj in scene.objects]
    objects_ok = all(matches)
    problems += [
        f"no {o.color} {o.shape}" for o, m in zip(scene.objects, matches, strict=True) if not m
    ]
    size_ok = _sizes_ok(scene.objects, matches, problems)
    count_ok = _count_ok(scene, detection.objects, matches, problems)
    relation_ok = _relation_ok(scene, matches, problems)
    return SceneCheck(
        background_ok=background_ok,
        objects_ok=objects_ok,
        count_ok=count_ok,
        relation_ok=relation_ok,
        size_ok=size_ok,
        reason="; ".join(problems),
        detection=detection,
    )


def _matching(blobs: tuple[Blob, ...], obj: SceneObject) -> list[Blob]:
    return [b for b in blobs if b.color == obj.color and b.shape == obj.shape]


def _sizes_ok(
    objects: tuple[SceneObject, ...], matches: list[list[Blob]], problems: list[str]
) -> bool:
    ok = True
    for obj, found in zip(objects, matches, strict=True):
        if obj.size is not None and (not found or any(b.size != obj.size for b in found)):
            ok = False
            if found:
                problems.append(f"{obj.color} {obj.shape} is not {obj.size}")
    return ok


def _count_ok(
    scene: Scene, blobs: tuple[Blob, ...], matches: list[list[Blob]], problems: list[str]
) -> bool:
    ok = True
    for obj, found in zip(scene.objects, matches, strict=True):
        if found and len(found) != scene.count:
            ok = False
            problems.append(f"{len(found)} {obj.color} {obj.shape}(s), expected {scene.count}")
    matched = {id(b) for found in matches for b in found}
    extra = [b.describe() for b in blobs if id(b) not in matched]
    if extra:
        problems.append("unexpected " + ", ".join(extra))
    return ok and all(matches) and not extra


def _relation_ok(scene: Scene, matches: list[list[Blob]], problems: list[str]) -> bool:
    if scene.relation is None:
        return True
    if not all(matches):
        return False  # cannot hold between objects that are not there
    subject, reference = (max(found, key=lambda b: b.area) for found in matches)
    dx, dy = subject.x - reference.x, subject.y - reference.y
    along, across = {
        "left of": (-dx, dy),
        "right of": (dx, dy),
        "above": (-dy, dx),
        "below": (dy, dx),
    }[scene.relation]
    if along >= RELATION_MARGIN and along > abs(across):
        return True
    first, second = scene.objects
    problems.append(
        f"{first.color} {first.shape} is not {scene.relation} the {second.color} {second.shape}"
    )
    return False

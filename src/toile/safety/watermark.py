"""Invisible watermark: the DWT-DCT mark of the ``invisible-watermark`` package, as SDXL uses it.

Every image toile generates can carry a 48-bit message that ``toile verify IMAGE`` (or
:func:`detect`) reads back. Two messages are known:

- ``toile`` (the default): the 6 bytes ``b"toile1"``; the package's own decoder reads it back
  as bytes: ``WatermarkDecoder("bytes", 48).decode(bgr, "dwtDct") == b"toile1"``;
- ``sdxl``: Stability AI's 48 bits, ``0xB3EC907BB19E`` (diffusers' ``WATERMARK_BITS``), which
  diffusers' SDXL pipelines put in their outputs.

The format is the package's ``dwtDct`` (``imwatermark/maxDct.py``), as its code does it, so
images marked by either side are read by the other: the image's U plane (BT.601 YUV, as
OpenCV's ``COLOR_BGR2YUV`` computes it, 8-bit offset 128), cropped to a multiple of 4; a
one-level Haar DWT; its approximation band cut into 4x4 blocks (8x8 pixels), row-major, block
``n`` carrying bit ``n % 48``; in each block the largest-magnitude coefficient other than the
block's first is quantised with step 36: ``|c| mod 36`` in the lower half of the step is a 0,
in the upper half a 1. Reading takes that per block and a majority vote per bit. (The package's
name says DCT, but its ``dwtDct`` quantises the wavelet coefficients directly; no DCT is
computed there, and none here.)

Why not the package itself: ``invisible-watermark`` 0.2.0 requires ``opencv-python``, whose
``cv2`` links the system's ``libGL.so.1`` and ``libglib-2.0`` (absent on a machine with only
Python, pip and gcc, so ``import imwatermark`` fails there), and an unpinned ``torch`` (for its
RivaGAN method only). ``opencv-python-headless`` provides the same ``cv2`` but cannot stand in
for the requirement in a locked install. The format needs only a Haar approximation band (2x2
sums) and a quantiser, a few lines of numpy, so they are written here; the tests check them
against the package's reading rule and diffusers' bits, and the package's decoder reads toile's
marks (checked by hand with invisible-watermark 0.2.0).

Writing the encoder here also fixes what costs the package bits (on the test image its own mark
reads back 34/48, below Stability's detector's line): it truncates instead of rounding, can
lower the chosen coefficient below another so that the reader looks at the wrong one, and
ignores clipping at 0 and 255. And it lets toile choose *how* to move the coefficient
(:class:`WatermarkMode`): the package moves that one coefficient, i.e. 2x2 pixels, which JPEG's
4:2:0 chroma subsampling averages away (0 % found after JPEG q90 in the benchmark); toile's
default moves the block's whole 8x8 mean U instead, by the least amount that works, which JPEG
keeps. The price is visibility: a mean colour change of about 2 (CIE76 dE, about one
just-noticeable difference; flat saturated colours show a faint 8x8 texture), against about 1
for the package's way.

Size: each 8x8 block carries one bit, so an image needs 48 blocks (e.g. 64x48) for every bit
to be written once; smaller ones are returned unchanged by :func:`embed` (:func:`apply` says
why) and :func:`detect` answers ``found=False`` with the reason. The package refuses anything
under 256x256 pixels; toile marks smaller images too, because the measurement says the mark
fits there: at 64x64 (toile-mini's size; 64 blocks, 1 or 2 per bit) it reads back 48/48 from
the PNG as written, but with no majority to vote it is often lost to JPEG, so :func:`detect`
adds a ``note`` under 256x256. Resizing and cropping move the block grid, which this format
does not survive (the package's README says the same). ``python -m
toile.safety.watermark_bench`` measures all of it; the README has the numbers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from toile.errors import RequestError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110
SDXL_BITS = tuple(int(bit) for bit in bin(SDXL_MESSAGE)[2:])
TOILE_BYTES = b"toile1"
TOILE_BITS = tuple(int(bit) for byte in TOILE_BYTES for bit in f"{byte:08b}")
BITS = 48

SCALE = 36.0  # the package's quantisation step (scales=[0, 36, 36]: the U plane only)
BLOCK = 4  # 4x4 blocks of the approximation band = 8x8 pixels
MIN_BLOCKS = BITS  # one 8x8 block per bit at least
ROBUST_PIXELS = 256 * 256  # the package's limit (WatermarkEncoder.encode); below it, a note
# Bits that must match for ``found``. An unmarked image matches a 48-bit message about as a
# coin would (24 on average): P(>= 40 of 48) = 1.7e-6, P(>= 36) = 4.7e-4 per reading. toile's
# own marks read back 48/48 (the README has the measured rates).
THRESHOLD = 40
# SDXL's marks, written by the package's encoder, lose bits (34/48 on the test image); >= 36 is
# where Stability's detector (generative-models, scripts/demo/detect.py) says "Marked. All
# images in this category were marked in our test" (10,000 images).
SDXL_THRESHOLD = 36
MARGIN = 8.0  # package mode: how far the marked coefficient stays above the next largest
# robust mode: how far inside its half-step (18 wide) the marked coefficient lands. Measured on
# the benchmark's 100 images at 512x512, found after JPEG q90 / q75 (mean CIE76 dE of the first
# 30): 3: 97 % / 92 % (1.84); 4: 100 % / 97 % (2.16); 5: 100 % / 98 % (2.52).
ROBUST_MARGIN = 4.0
PASSES = 4  # marking passes: blocks that rounding or clipping spoiled are marked again

# OpenCV's BT.601 YUV (imgproc color_yuv): U = 0.492111 (B - Y) + 128 for 8-bit images. Only U
# changes when marking; moving B and G along (2.032118, -0.394642), OpenCV's inverse, keeps Y
# and V as they were.
_Y = (0.299, 0.587, 0.114)
_U_FROM_B_MINUS_Y = 0.492111
_U_OFFSET_UINT8 = 128.0
# diffusers marks float images in 0..255, for which OpenCV's offset is 0.5, not 128: SDXL's
# marks read better with that offset, so detect() reads with both.
_U_OFFSET_FLOAT = 0.5
_READINGS = (_U_OFFSET_UINT8, _U_OFFSET_FLOAT)
_B_PER_U = 2.032118
_G_PER_U = -0.394642


class WatermarkMode(StrEnum):
    """How a block's chosen coefficient is moved (both are read the same way).

    ``robust`` (the default) shifts the whole block, i.e. the mean U of its 8x8 pixels, by the
    least that puts the coefficient :data:`ROBUST_MARGIN` inside the right half-step: it
    survives JPEG, whose 4:2:0 chroma keeps 8x8 means. ``package`` moves the chosen coefficient
    alone, i.e. 2x2 pixels, to the half-step's centre, as the package does: less visible, but
    JPEG's chroma subsampling averages it away."""

    ROBUST = "robust"
    PACKAGE = "package"


class WatermarkMessage(StrEnum):
    TOILE = "toile"
    SDXL = "sdxl"


MESSAGES: dict[WatermarkMessage, tuple[int, ...]] = {
    WatermarkMessage.TOILE: TOILE_BITS,
    WatermarkMessage.SDXL: SDXL_BITS,
}


@dataclass(frozen=True)
class WatermarkConfig:
    """``enabled``: mark every generated image (the default). ``message``: which 48 bits
    (toile's by default). ``mode``: how they are written (:class:`WatermarkMode`)."""

    enabled: bool = True
    message: WatermarkMessage = WatermarkMessage.TOILE
    mode: WatermarkMode = WatermarkMode.ROBUST

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise RequestError("watermark.enabled", f"must be true or false, got {self.enabled!r}")
        for name, kind in (("message", WatermarkMessage), ("mode", WatermarkMode)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                allowed = ", ".join(m.value for m in kind)
                raise RequestError(
                    f"watermark.{name}", f"must be one of {allowed}, got {value!r}"
                ) from None


WATERMARK_ENV = "TOILE_WATERMARK"


def default_config() -> WatermarkConfig:
    """On, unless ``TOILE_WATERMARK=0`` (a user's own choice for bit-exact pixels)."""
    return WatermarkConfig(enabled=os.environ.get(WATERMARK_ENV, "1") != "0")


@dataclass(frozen=True)
class EmbedOutcome:
    """What :func:`apply` did: ``applied`` and the message, or why not (``reason``); ``note``
    as in :class:`WatermarkResult`."""

    applied: bool
    message: str | None
    reason: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WatermarkResult:
    """What :func:`detect` read: ``bits_matched`` of ``bits_total`` agree with the known
    ``message`` (toile's or SDXL's, whichever is found, else the closer to its threshold), and
    ``found`` when that is at least ``threshold``. ``reason`` says why nothing was read (an image
    too small), or is empty; ``note`` warns when the image is small enough that a mark may have
    been lost to JPEG (under 256x256)."""

    found: bool
    bits_matched: int
    bits_total: int
    message: str | None
    threshold: int = THRESHOLD
    reason: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def too_small(width: int, height: int) -> str:
    """Why an image of this size cannot carry the watermark, or ``""`` when it can."""
    blocks = (width // 8) * (height // 8)
    if blocks < MIN_BLOCKS:
        return (
            f"the image is {width}x{height}: {blocks} 8x8 blocks, and the watermark needs one "
            f"per bit, {MIN_BLOCKS} (e.g. 64x48)"
        )
    return ""


def small_note(width: int, height: int) -> str:
    """The caveat for images under 256x256 (few blocks per bit), or ``""``."""
    if width * height < ROBUST_PIXELS:
        return (
            f"at {width}x{height} each bit has few blocks: the mark reads back from the PNG as "
            "written, but JPEG copies often lose it (reliable from 256x256)"
        )
    return ""


def apply(
    image: Image.Image, config: WatermarkConfig | None = None
) -> tuple[Image.Image, EmbedOutcome]:
    """Mark ``image`` as ``config`` says; the image (a new one when marked) and what was done.

    An image too small for the watermark (:func:`too_small`) comes back unchanged with
    ``applied=False`` and the reason, as does every image when ``config.enabled`` is false.
    RGBA keeps its alpha; other modes are converted to RGB.
    """
    config = config or WatermarkConfig()
    if not config.enabled:
        return image, EmbedOutcome(False, None, "watermarking is disabled")
    reason = too_small(*image.size)
    if reason:
        return image, EmbedOutcome(False, None, reason)
    marked = _embed_image(image, MESSAGES[config.message], config.mode)
    return marked, EmbedOutcome(True, config.message.value, note=small_note(*image.size))


def embed(image: Image.Image, config: WatermarkConfig | None = None) -> Image.Image:
    """The image marked with ``config.message`` (toile's by default); see :func:`apply`."""
    return apply(image, config)[0]


def detect(image: Image.Image) -> WatermarkResult:
    """Read the 48 bits and compare them with toile's message and SDXL's.

    toile's is read as toile writes it (8-bit U offset) and needs :data:`THRESHOLD` bits. SDXL's
    is read with both of OpenCV's U offsets (diffusers marks float images, whose offset differs)
    and needs :data:`SDXL_THRESHOLD`, the line of Stability's own detector: the package's encoder
    that writes it loses bits (its mark on the test image reads 34 or 35 of 48, not 48).
    """
    reason = too_small(*image.size)
    if reason:
        return WatermarkResult(False, 0, BITS, None, reason=reason)
    note = small_note(*image.size)
    rgb = _rgb_array(image)
    readings = {offset: decode_bits(rgb, offset=offset) for offset in _READINGS}
    results = []
    for name, offsets, threshold in (
        (WatermarkMessage.TOILE, (_U_OFFSET_UINT8,), THRESHOLD),
        (WatermarkMessage.SDXL, _READINGS, SDXL_THRESHOLD),
    ):
        matched = max(_matches(readings[offset], MESSAGES[name]) for offset in offsets)
        found = matched >= threshold
        results.append(WatermarkResult(found, matched, BITS, name.value, threshold, note=note))
    # The one found, else the one nearest its threshold (toile's on a tie).
    return max(results, key=lambda r: (r.found, r.bits_matched - r.threshold))


def _matches(bits: list[int], message: tuple[int, ...]) -> int:
    return sum(int(a == b) for a, b in zip(bits, message, strict=True))


# --- the algorithm -------------------------------------------------------------------------


def _rgb_array(image: Image.Image) -> np.ndarray:
    import numpy as np

    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.float64)


def _u_plane(rgb: np.ndarray, offset: float = _U_OFFSET_UINT8) -> np.ndarray:
    y = rgb[..., 0] * _Y[0] + rgb[..., 1] * _Y[1] + rgb[..., 2] * _Y[2]
    return (rgb[..., 2] - y) * _U_FROM_B_MINUS_Y + offset


def haar_approx(plane: np.ndarray) -> np.ndarray:
    """The approximation band of a one-level 2-D Haar DWT (``pywt.dwt2(x, "haar")[0]`` for even
    sizes): each 2x2 block's sum / 2."""
    return (plane[0::2, 0::2] + plane[1::2, 0::2] + plane[0::2, 1::2] + plane[1::2, 1::2]) / 2


def _blocks(rgb: np.ndarray, offset: float) -> np.ndarray:
    """The approximation band's 4x4 blocks, row-major, as rows of 16 coefficients."""
    h, w = rgb.shape[0] // 8, rgb.shape[1] // 8  # blocks down and across (the package's count)
    ca = haar_approx(_u_plane(rgb[: h * 8, : w * 8], offset))
    return ca.reshape(h, BLOCK, w, BLOCK).transpose(0, 2, 1, 3).reshape(h * w, BLOCK * BLOCK)


def _chosen(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block: the position (1..15) of the largest |coefficient| past the first, its value,
    and the next largest |coefficient| (the one the chosen must stay above)."""
    import numpy as np

    magnitudes = np.abs(blocks[:, 1:])
    pos = np.argmax(magnitudes, axis=1)
    rows = np.arange(len(blocks))
    value = blocks[rows, pos + 1]
    rest = magnitudes.copy()
    rest[rows, pos] = -np.inf
    return pos + 1, value, rest.max(axis=1)


def _read(value: np.ndarray) -> np.ndarray:
    import numpy as np

    return (np.abs(value) % SCALE > SCALE / 2).astype(np.int64)


def decode_bits(rgb: np.ndarray, *, offset: float = _U_OFFSET_UINT8) -> list[int]:
    """The 48 bits a ``dwtDct`` reader gets from an RGB array (0..255): per block the chosen
    coefficient's ``|c| mod 36 > 18``, averaged per bit, rounded as the package does."""
    import numpy as np

    blocks = _blocks(rgb, offset)
    _, value, _ = _chosen(blocks)
    votes = _read(value)
    index = np.arange(len(blocks)) % BITS
    ones = np.bincount(index, weights=votes, minlength=BITS)
    counts = np.bincount(index, minlength=BITS)
    # The package: mean * 255 > 127. A bit with no block (too few blocks) reads as 0.
    mean = np.divide(ones, counts, out=np.zeros(BITS), where=counts > 0)
    return [int(m * 255 > 127) for m in mean]


def _nearest_centre(value: np.ndarray, floor: np.ndarray, want: np.ndarray) -> np.ndarray:
    """The package's targets: the centre ``(k + 1/4 + want/2)·36`` of the right half-step
    nearest ``value``, raised a step at a time until it is at least ``floor``."""
    import numpy as np

    offset = (0.25 + 0.5 * want) * SCALE
    k = np.floor((value - offset) / SCALE)
    below, above = k * SCALE + offset, (k + 1) * SCALE + offset
    target = np.where(value - below <= above - value, below, above)
    lowest = np.ceil((floor - offset) / SCALE) * SCALE + offset  # first centre >= floor
    return np.maximum(target, lowest)


def _nearest_inside(
    value: np.ndarray, want: np.ndarray, margin: float, direction: np.ndarray | int = 0
) -> np.ndarray:
    """The nearest value that reads ``want`` with ``margin`` to spare, i.e. inside
    ``[k·36 + 18·want + margin, k·36 + 18·want + 18 - margin]`` (``value`` itself if it is);
    where ``direction`` is +1 or -1, the nearest above or below ``value``."""
    import numpy as np

    low = SCALE / 2 * want + margin
    high = SCALE / 2 * want + SCALE / 2 - margin
    base = value - value % SCALE
    candidates = np.stack([base - SCALE + high, base + low, base + high, base + SCALE + low], 1)
    distance = candidates - value[:, None]
    direction = np.broadcast_to(np.asarray(direction), value.shape)[:, None]
    distance = np.where(distance * direction < 0, np.inf, np.abs(distance))
    nearest = candidates[np.arange(len(value)), np.argmin(distance, 1)]
    inside = (value % SCALE >= low) & (value % SCALE <= high)
    return np.where(inside, value, nearest)


def _embed_array(
    rgb: np.ndarray, bits: tuple[int, ...], mode: WatermarkMode = WatermarkMode.ROBUST
) -> np.ndarray:
    """Mark an RGB float array (0..255) and return it as uint8. See :class:`WatermarkMode`."""
    import numpy as np

    height, width = rgb.shape[0] // 8, rgb.shape[1] // 8
    n = height * width
    want = np.asarray(bits, dtype=np.int64)[np.arange(n) % BITS]
    rows = np.arange(n)
    out = np.clip(np.rint(rgb), 0, 255)
    for attempt in range(PASSES):
        blocks = _blocks(out, _U_OFFSET_UINT8)
        pos, value, second = _chosen(blocks)
        if mode is WatermarkMode.PACKAGE:
            target = _nearest_centre(value, second + MARGIN, want)
            ok = (_read(value) == want) & (value - second >= MARGIN / 2)
        else:
            target = _nearest_inside(value, want, ROBUST_MARGIN)
            ok = np.abs(target - value) < 1  # within rounding of the target
        if ok.all():
            break
        if attempt >= 2:
            # Still wrong after two passes: clipping at 0 or 255 stops the move, so go the
            # other way.
            away = -np.sign(target - value)
            if mode is WatermarkMode.PACKAGE:
                other = target + away * SCALE
                target = np.where(other - second >= MARGIN, other, target)
            else:
                target = _nearest_inside(value, want, ROBUST_MARGIN, away)
        delta = np.where(ok, 0.0, target - value)
        delta_ca = np.zeros((n, BLOCK * BLOCK))
        if mode is WatermarkMode.PACKAGE:
            delta_ca[rows, pos] = delta  # the chosen coefficient only: 2x2 pixels
        else:
            delta_ca[:] = delta[:, None]  # the whole block: its 8x8 pixels' mean U
        # Back to the approximation band's layout, then to pixels: with the detail bands
        # unchanged, a change d of a Haar approximation coefficient is d/2 on its 4 pixels.
        delta_ca = delta_ca.reshape(height, width, BLOCK, BLOCK).transpose(0, 2, 1, 3)
        delta_ca = delta_ca.reshape(height * BLOCK, width * BLOCK)
        delta_u = np.repeat(np.repeat(delta_ca / 2, 2, axis=0), 2, axis=1)
        region = out[: height * 8, : width * 8]
        region[..., 2] += _B_PER_U * delta_u
        region[..., 1] += _G_PER_U * delta_u
        out = np.clip(np.rint(out), 0, 255)
    return out.astype(np.uint8)


def _embed_image(image: Image.Image, bits: tuple[int, ...], mode: WatermarkMode) -> Image.Image:
    from PIL import Image

    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    marked = Image.fromarray(_embed_array(_rgb_array(image), bits, mode))
    if alpha is not None:
        marked.putalpha(alpha)
    marked.info.update(image.info)
    return marked

"""The invisible watermark (toile.safety.watermark) and `toile verify`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from toile.errors import RequestError
from toile.safety import watermark as wm

TOILE = str(Path(sys.executable).parent / "toile")


def natural_image(size: int = 512, seed: int = 0) -> Image.Image:
    """A smooth two-way gradient with flat shapes and a little noise: like a generated image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([200 * x + 30, 150 * y + 50, 120 * (1 - x) * y + 80], axis=-1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([size * 0.1, size * 0.2, size * 0.5, size * 0.6], fill=(220, 40, 40))
    draw.rectangle([size * 0.55, size * 0.5, size * 0.9, size * 0.85], fill=(30, 60, 200))
    draw.polygon(
        [(size * 0.2, size * 0.9), (size * 0.45, size * 0.65), (size * 0.6, size * 0.95)],
        fill=(250, 220, 30),
    )
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 2, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


@pytest.fixture(scope="module")
def plain() -> Image.Image:
    return natural_image()


@pytest.fixture(scope="module")
def marked(plain: Image.Image) -> Image.Image:
    return wm.embed(plain)


def test_messages():
    from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS

    assert list(wm.SDXL_BITS) == WATERMARK_BITS  # the bits diffusers' SDXL pipelines write
    assert len(wm.TOILE_BITS) == wm.BITS == 48
    assert np.packbits(wm.TOILE_BITS).tobytes() == b"toile1"
    # The two messages are far apart, so neither is read as the other.
    assert sum(a != b for a, b in zip(wm.SDXL_BITS, wm.TOILE_BITS, strict=True)) >= 20


def test_embed_then_detect(plain, marked):
    assert marked.size == plain.size and marked.mode == "RGB"
    result = wm.detect(marked)
    assert result.found and result.message == "toile"
    assert result.bits_matched == result.bits_total == 48
    # Invisible: small change on average (PSNR), only the colour (U) moves.
    a, b = np.asarray(plain, dtype=np.float64), np.asarray(marked, dtype=np.float64)
    assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 32
    y = lambda rgb: rgb @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    assert np.abs(y(a) - y(b)).mean() < 0.5


def test_survives_png_and_jpeg_q90(marked, tmp_path):
    marked.save(tmp_path / "m.png")
    assert wm.detect(Image.open(tmp_path / "m.png")).bits_matched == 48
    result = wm.detect(jpeg(marked, 90))
    assert result.found and result.message == "toile" and result.bits_matched >= 46


def test_absent_on_unmarked(plain):
    for image in (plain, jpeg(plain, 90), Image.new("RGB", (512, 512), (90, 140, 200))):
        result = wm.detect(image)
        assert not result.found and result.reason == result.note == ""
        assert result.bits_matched < 36


def test_sdxl_message_and_package_mode(plain):
    config = wm.WatermarkConfig(message="sdxl", mode="package")
    assert config.message is wm.WatermarkMessage.SDXL
    result = wm.detect(wm.embed(plain, config))
    assert result.found and result.message == "sdxl" and result.bits_matched == 48


def test_matches_the_package_reader(marked):
    """The bits as the package's decoder computes them (its maxDct.decode, on OpenCV's 8-bit
    YUV), written out in numpy: every 8x8 block votes for bit n % 48."""
    rgb = np.asarray(marked, dtype=np.float64)
    y = rgb @ np.array([0.299, 0.587, 0.114])
    u = (rgb[..., 2] - y) * 0.492111 + 128
    votes: list[list[int]] = [[] for _ in range(48)]
    n = 0
    for i in range(512 // 8):
        for j in range(512 // 8):
            patch = u[i * 8 : i * 8 + 8, j * 8 : j * 8 + 8]
            ca = (patch[0::2, 0::2] + patch[1::2, 0::2] + patch[0::2, 1::2] + patch[1::2, 1::2])
            flat = (ca / 2).flatten()
            value = abs(flat[1 + np.argmax(np.abs(flat[1:]))])
            votes[n % 48].append(int(value % 36 > 18))
            n += 1
    bits = [int(np.mean(v) * 255 > 127) for v in votes]
    assert bytes(np.packbits(bits)) == b"toile1"


def test_small_images():
    """64x64 (toile-mini's size) has 64 blocks for 48 bits: marked, read back from the PNG,
    with a note; below 48 blocks nothing is written and nothing read."""
    small = natural_image(64)
    image, outcome = wm.apply(small)
    assert outcome.applied and "64x64" in outcome.note
    result = wm.detect(image)
    assert result.found and result.bits_matched == 48 and "JPEG" in result.note
    assert not wm.detect(small).found

    tiny = natural_image(48)
    image, outcome = wm.apply(tiny)
    assert image is tiny and not outcome.applied
    assert outcome.reason == (
        "the image is 48x48: 36 8x8 blocks, and the watermark needs one per bit, 48 (e.g. 64x48)"
    )
    result = wm.detect(tiny)
    assert not result.found and result.reason == outcome.reason
    assert wm.too_small(64, 48) == "" and wm.too_small(64, 40) != ""


def test_disabled_and_alpha(plain):
    image, outcome = wm.apply(plain, wm.WatermarkConfig(enabled=False))
    assert image is plain and not outcome.applied
    rgba = plain.convert("RGBA")
    rgba.putalpha(200)
    marked = wm.embed(rgba)
    assert marked.mode == "RGBA" and marked.getchannel("A").getextrema() == (200, 200)
    assert wm.detect(marked).found


def test_config_errors():
    with pytest.raises(RequestError, match=r"watermark\.message: must be one of toile, sdxl"):
        wm.WatermarkConfig(message="stability")
    with pytest.raises(RequestError, match=r"watermark\.mode"):
        wm.WatermarkConfig(mode="strong")


def toile(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOILE_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([TOILE, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_verify(marked, plain, tmp_path, toile_home):
    marked.save(tmp_path / "marked.png")
    plain.save(tmp_path / "plain.png")
    (tmp_path / "notes.txt").write_text("not an image\n")

    proc = toile("verify", str(tmp_path / "marked.png"), home=toile_home)
    assert proc.returncode == 0, proc.stderr
    assert "toile watermark found (48/48 bits match)" in proc.stdout

    proc = toile("verify", str(tmp_path / "plain.png"), "--json", home=toile_home)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["found"] is False and data["bits_total"] == 48 and data["bits_matched"] < 36

    proc = toile("verify", str(tmp_path / "notes.txt"), home=toile_home)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"toile verify: error: image: {tmp_path / 'notes.txt'} is not an image file "
        "(PNG, JPEG, WebP, BMP, GIF, TIFF...)"
    ]


def test_every_generated_image_is_marked_by_default(tmp_path, monkeypatch, toile_home):
    """The engine marks the pixels it returns (CLI, Python API and server alike) unless told
    not to; `toile verify` reads the mark from the written PNG."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from toile.engine.engine import Engine
    from toile.request import GenerationRequest
    from toile.safety.watermark import WatermarkConfig, detect

    prompt = "a red circle on a blue background"
    marked = Engine(device="cpu", watermark=WatermarkConfig()).run(
        GenerationRequest(prompt, seed=1, steps=2))
    assert detect(marked.images[0]).found
    assert marked.records[0].safety["watermark"]["applied"] is True
    plain = Engine(device="cpu", watermark=WatermarkConfig(enabled=False)).run(
        GenerationRequest(prompt, seed=1, steps=2))
    assert not detect(plain.images[0]).found
    toile = str(Path(sys.executable).parent / "toile")
    env = {k: v for k, v in os.environ.items() if k != "TOILE_WATERMARK"}  # the user's default
    out = tmp_path / "x.png"
    subprocess.run([toile, "generate", prompt, "--steps", "2", "-o", str(out)], env=env,
                   check=True, capture_output=True, timeout=300)
    verified = subprocess.run([toile, "verify", str(out)], env=env, capture_output=True,
                              text=True, timeout=120)
    assert verified.returncode == 0 and "watermark found" in verified.stdout
    subprocess.run([toile, "generate", prompt, "--steps", "2", "-o", str(out),
                    "--no-watermark"], env=env, check=True, capture_output=True, timeout=300)
    unmarked = subprocess.run([toile, "verify", str(out)], env=env, capture_output=True,
                              text=True, timeout=120)
    assert "no watermark found" in unmarked.stdout

"""Safe loading: pickle refused, bad images rejected before decoding, records round-trip."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from toile.engine.engine import Engine
from toile.engine.models import ModelRegistry
from toile.errors import ImageInputError, ModelFormatError, ModelNotFoundError, UnsafeFileError
from toile.families.registry import detect_family
from toile.io.images import load_mask, open_image
from toile.io.metadata import a1111_parameters, read_record, save_png
from toile.io.weights import check_folder_weights
from toile.request import GenerationRequest
from toile.result import ImageRecord


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_files_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFileError, match="pickle files can run arbitrary code"):
        detect_family(path)


def test_folder_with_pickle_weights_refused(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(tiny_models("sd"), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="diffusion_pytorch_model.bin"):
        check_folder_weights(folder)
    (folder / "unet" / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(ModelFormatError, match="missing weights for component 'unet'"):
        Engine(device="cpu").run(GenerationRequest("a", model=str(folder), steps=1))


def test_model_folders_with_code_are_refused_before_anything_runs(tiny_models, tmp_path):
    """A folder's own .py (a custom pipeline) never runs and a library a folder names is never
    imported, whatever the diffusers version: both are refused before loading."""
    import json
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(tiny_models("sd"), folder)
    marker = tmp_path / "ran.txt"
    (folder / "unet" / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    engine = Engine(device="cpu")
    with pytest.raises(UnsafeFileError, match=r"contains code \(unet/pipeline.py\)"):
        engine.run(GenerationRequest("a", model=str(folder), steps=1))
    (folder / "unet" / "pipeline.py").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["my_evil_module", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeFileError, match="names library 'my_evil_module' for 'unet'"):
        engine.run(GenerationRequest("a", model=str(folder), steps=1))
    assert not marker.exists()


def test_unknown_layouts_say_what_was_found(tmp_path):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "notes.txt").write_text("hi")
    with pytest.raises(ModelFormatError, match="without model_index.json containing: notes.txt"):
        detect_family(tmp_path / "weird")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "Nope"}))
    with pytest.raises(ModelFormatError, match="pipeline class is 'Nope'"):
        detect_family(tmp_path / "odd")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelFormatError, match="cannot be read"):
        detect_family(broken)


def test_unknown_model_id_and_missing_path():
    with pytest.raises(ModelNotFoundError, match="unknown model id 'nope'; known ids: toile-mini"):
        ModelRegistry().resolve("nope")
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        ModelRegistry().resolve("/no/such/model")


def test_registry_add_list_remove(tiny_models):
    registry = ModelRegistry()
    registry.add("tiny", tiny_models("sd"))
    assert registry.resolve("tiny").path == tiny_models("sd").resolve()
    builtins = ["toile-mini", "toile-reader", "toile-sr", "lanczos", "bicubic", "nearest"]
    assert [e.id for e in registry.entries()] == [*builtins, "tiny"]
    registry.remove("tiny")
    assert [e.id for e in registry.entries()] == builtins


def test_image_errors(tmp_path):
    with pytest.raises(ImageInputError, match="image: file not found"):
        open_image(str(tmp_path / "missing.png"), field="image")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    with pytest.raises(ImageInputError, match="image: .*text.png is not an image file"):
        open_image(str(text), field="image")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ImageInputError, match="mask: .*(truncated|not a readable)"):
        open_image(str(truncated), field="mask")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # A 20000x20000 single-colour PNG is tiny on disk but 400 M pixels once decoded.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ImageInputError, match="at most 67108864 pixels are allowed"):
        open_image(str(bomb), field="image")


def test_transparent_mask_means_repaint(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 0))
    path = tmp_path / "mask.png"
    rgba.save(path)
    mask = load_mask(str(path))
    assert mask.getpixel((2, 2)) == 255 and mask.getpixel((0, 0)) == 0


def test_record_round_trip_and_a1111_text(tmp_path):
    record = ImageRecord(
        model_id="m",
        family="sd",
        model_hash="abcdef0123456789",
        mode="img2img",
        prompt="a cat",
        negative_prompt="blurry",
        width=64,
        height=48,
        steps=20,
        guidance=7.5,
        seed=42,
        strength=0.6,
        loras=({"name": "style", "hash": "1234", "scale": 0.8},),
        sampler="Euler",
        schedule="karras",
        prompt_weights=(("a ", 1.0), ("cat", 1.2)),
        software={"toile": "0.1.0"},
        timings={"generate_s": 1.5},
    )
    path = tmp_path / "out.png"
    save_png(Image.new("RGB", (64, 48)), record, str(path))
    assert read_record(str(path)) == record
    text = a1111_parameters(record)
    assert text.splitlines()[0] == "a cat"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert (
        "Steps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x48, "
        "Model hash: abcdef0123, Model: m, Denoising strength: 0.6" in text
    )
    with Image.open(path) as image:
        assert image.info["parameters"] == text


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(tmp_path):
    """A small progressive JPEG made of many (empty) scans would hold the decoder for minutes;
    its start-of-scan markers are counted first."""
    import io

    from toile.io.images import MAX_JPEG_SCANS, open_image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "JPEG", progressive=True)
    normal = buffer.getvalue()
    assert open_image(normal, field="image").size == (64, 64)  # a real progressive JPEG is fine
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    hostile = normal[:-2] + empty_scan * 5000 + b"\xff\xd9"
    assert len(hostile) < 1_000_000
    with pytest.raises(ImageInputError, match=f"scans; at most {MAX_JPEG_SCANS}"):
        open_image(hostile, field="image")
    path = tmp_path / "scans.jpg"
    path.write_bytes(hostile)
    with pytest.raises(ImageInputError, match="scans.jpg is a JPEG with 50"):
        open_image(str(path), field="image")

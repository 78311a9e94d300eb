"""Hostile input: a short seeded run of ``toile.tools.fuzz`` (0 findings), and one regression
test per traceback it found, each with the crafted input spelled out here. The full-size
measurement (10,000+ files of each kind) is ``python -m toile.tools.fuzz`` by hand."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from toile.errors import ImageInputError, ModelFormatError, RequestError, ToileError
from toile.request import LoraSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOILE = str(Path(sys.executable).parent / "toile")


# ------------------------------------------------------------------------------------- helpers


def safetensors_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def rewrite_metadata(data: bytes, **changes: str | None) -> bytes:
    """A safetensors file with some ``__metadata__`` strings replaced (None: removed)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    meta = dict(header.get("__metadata__", {}))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    header["__metadata__"] = meta
    return safetensors_bytes(header, data[8 + size:])


def png_with_text(**chunks: str) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def assert_clean(exc: ToileError, *fragments: str) -> None:
    text = str(exc)
    assert "\n" not in text and len(text) < 1000, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture(scope="module")
def lora_targets(tmp_path_factory):
    """The fuzzer's own set-up: toile-mini's U-Net, a tiny SD pipeline, and a valid LoRA file
    for each (toile, SD peft layout, SD kohya layout)."""
    from toile.tools.fuzz import SafetensorsTargets

    return SafetensorsTargets(tmp_path_factory.mktemp("fuzz-loras"))


@pytest.fixture(scope="module")
def model_targets(tmp_path_factory):
    """A tiny toile model folder (the built-in model's layout, its text encoder inside)."""
    from toile.tools.fuzz import ModelTargets

    return ModelTargets(tmp_path_factory.mktemp("fuzz-models"))


def seed_lora(targets, name: str) -> bytes:
    return dict(targets.seeds)[name]


def apply_toile(targets, path: Path) -> None:
    from toile.families.toile.lora import loras_applied

    with loras_applied(targets.toile_unet, (LoraSpec(str(path)),)):
        pass


def apply_sd(targets, path: Path) -> None:
    from toile.families.diffusers_common import loras_applied

    with loras_applied(targets.sd_pipe, (LoraSpec(str(path)),)):
        pass


# ------------------------------------------------------------------------------ the short run


def test_short_seeded_run_has_no_findings():
    from toile.tools.fuzz import fuzz

    report = fuzz(7, safetensors=300, images=300, models=20, budget_s=25)
    summary = report.table()
    assert report.findings == [], summary
    assert report.kinds["safetensors"] >= 50 and report.kinds["images"] >= 50, summary
    assert report.kinds["models"] >= 3, summary
    names = set(report.counts)
    assert {"st:loras-info", "st:loras-add", "st:detect-model", "st:toile-lora", "st:sd-lora",
            "img:cli-load-rgb", "img:cli-load-mask", "img:info", "img:info-a1111",
            "img:upload-image", "img:upload-mask", "img:openai-multipart", "model:detect",
            "model:load"} <= names
    for counts in report.counts.values():
        assert counts.cases == counts.ok + counts.clean
    # the seed files are valid: some cases load
    assert report.counts["img:cli-load-rgb"].ok > 0 and report.counts["st:loras-info"].ok > 0
    data = report.to_dict()
    assert data["totals"]["findings"] == 0 and json.dumps(data)


def test_the_oracle_flags_tracebacks_hangs_and_long_messages(tmp_path):
    from toile.tools.fuzz import Fuzzer

    fuzzer = Fuzzer(0, hang_s=0.2)

    def hang() -> None:
        while True:
            pass

    def wall() -> None:
        raise ModelFormatError("x" * 5000)

    fuzzer.run("t", "k", 0, "m", b"", lambda: {}["missing"])
    fuzzer.run("t", "k", 1, "m", b"", hang)
    fuzzer.run("t", "k", 2, "m", b"", wall)
    fuzzer.run("t", "k", 3, "m", b"", lambda: (_ for _ in ()).throw(RequestError("a", "b")))
    fuzzer.run("t", "k", 4, "m", b"", lambda: None)
    errors = [f.error for f in fuzzer.report.findings]
    assert errors == ["KeyError", "hang", "message too long"]
    counts = fuzzer.report.counts["t"]
    assert (counts.cases, counts.ok, counts.clean, counts.findings) == (5, 1, 1, 3)


def test_cli_reports_counts_as_json():
    proc = subprocess.run(
        [sys.executable, "-m", "toile.tools.fuzz", "--seed", "3", "--safetensors", "0",
         "--images", "40", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["inputs"] == {"images": 40}
    assert report["totals"]["cases"] == 40 * 7 and report["totals"]["findings"] == 0


# ------------------------------------------------------------ regressions: LoRA files (SD path)


def test_sd_lora_with_broken_offsets_is_one_line(lora_targets, tmp_path):
    # was: SafetensorError -> UnicodeDecodeError -> OSError from diffusers (a traceback)
    header = {"unet.a.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]}}
    path = tmp_path / "offsets.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 16))
    with pytest.raises(RequestError) as info:
        apply_sd(lora_targets, path)
    assert_clean(info.value, "loras: ", str(path), "is not a readable .safetensors file")


def test_sd_lora_without_matching_layers(lora_targets, tmp_path):
    # was: ValueError "Adapter name(s) {'toile_lora_0'} not in the list of present adapters"
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "elsewhere.safetensors"
    save_file({"unet.nowhere.lora_A.weight": torch.zeros(2, 4),
               "unet.nowhere.lora_B.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(RequestError) as info:
        apply_sd(lora_targets, path)
    assert_clean(info.value, f"cannot apply {path}")
    assert not any(lora_targets.sd_pipe.get_list_adapters().values())


def test_sd_lora_failing_half_way_is_unloaded(lora_targets, tmp_path):
    # was: a kohya file whose U-Net part loaded and whose text-encoder part failed stayed
    # loaded in the pipeline, applied to every later request
    from safetensors.torch import load, save

    tensors = load(seed_lora(lora_targets, "sd-kohya-lora"))
    kept = {k: v for k, v in tensors.items() if not ("lora_te_" in k and "out_proj" in k)}
    path = tmp_path / "half.safetensors"
    path.write_bytes(save(kept))
    with pytest.raises(RequestError) as info:
        apply_sd(lora_targets, path)
    assert_clean(info.value, f"cannot apply {path}")
    assert not any(lora_targets.sd_pipe.get_list_adapters().values())


def test_sd_lora_metadata_of_the_wrong_kind(lora_targets, tmp_path):
    # was: AttributeError "'float' object has no attribute 'items'" / TypeError "LoraConfig
    # class could not be instantiated" from peft
    data = seed_lora(lora_targets, "sd-peft-lora")
    for value, expected in (("1.5", "must be a JSON object, not float"),
                            ('{"unet.r": "x"}', "gives rank x for 'unet.r'"),
                            ('{"unet.rank_pattern": 5}', "must be an object of layer name")):
        path = tmp_path / "meta.safetensors"
        path.write_bytes(rewrite_metadata(data, lora_adapter_metadata=value))
        with pytest.raises(RequestError) as info:
            apply_sd(lora_targets, path)
        assert_clean(info.value, str(path), expected)


def test_lora_with_a_huge_rank_is_refused_before_peft_allocates_it(lora_targets, tmp_path):
    # peft builds layers of the metadata's rank before loading any weight: 10**7 would be
    # gigabytes for a file of a few kilobytes
    data = seed_lora(lora_targets, "toile-lora")
    (size,) = struct.unpack("<Q", data[:8])
    adapters = json.loads(json.loads(data[8:8 + size])["__metadata__"]["lora_adapter_metadata"])
    adapters["unet.r"] = 10**7
    path = tmp_path / "rank.safetensors"
    path.write_bytes(rewrite_metadata(data, lora_adapter_metadata=json.dumps(adapters)))
    with pytest.raises(RequestError) as info:
        apply_toile(lora_targets, path)
    assert_clean(info.value, "gives rank 10000000 for 'unet.r'")
    with pytest.raises(ModelFormatError, match="gives rank 10000000"):
        from toile.engine.models import LoraRegistry

        LoraRegistry(tmp_path / "loras.json").add("big", path)


# --------------------------------------------------------- regressions: LoRA files (toile path)


def test_toile_lora_with_invalid_adapter_json(lora_targets, tmp_path):
    # was: json.JSONDecodeError from read_unet_lora (a traceback from `toile generate --lora`)
    path = tmp_path / "json.safetensors"
    path.write_bytes(rewrite_metadata(seed_lora(lora_targets, "toile-lora"),
                                      lora_adapter_metadata="{"))
    with pytest.raises(RequestError) as info:
        apply_toile(lora_targets, path)
    assert_clean(info.value, "loras: ", str(path), "lora_adapter_metadata is not valid JSON")


def test_toile_lora_with_a_vector_for_a_matrix(lora_targets, tmp_path):
    # was: IndexError "list index out of range" in peft's get_peft_kwargs
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "vector.safetensors"
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
               torch.zeros(4)}, str(path))
    with pytest.raises(RequestError) as info:
        apply_toile(lora_targets, path)
    assert_clean(info.value, "has shape [4]; LoRA weights are matrices")


def test_lora_for_another_model_is_one_line(lora_targets, tmp_path):
    # was: torch's "Error(s) in loading state_dict ...\n\tsize mismatch ..." over many lines
    path = tmp_path / "sd.safetensors"
    path.write_bytes(seed_lora(lora_targets, "sd-peft-lora"))
    with pytest.raises(RequestError) as info:
        apply_toile(lora_targets, path)
    assert_clean(info.value, f"cannot apply {path} to this toile model", "size mismatch")
    assert not getattr(lora_targets.toile_unet, "peft_config", None)


def test_deeply_nested_toile_metadata(lora_targets, tmp_path):
    # was: RecursionError from read_lora_info (`toile loras` and the family check)
    from toile.io.lora_info import read_lora_info

    path = tmp_path / "deep.safetensors"
    path.write_bytes(rewrite_metadata(seed_lora(lora_targets, "toile-lora"),
                                      **{"toile.prompt": "[" * 100_000 + "]" * 100_000}))
    assert read_lora_info(path)["prompt"].startswith("[[[")
    apply_toile(lora_targets, path)  # the metadata is only informative: the LoRA still works


def test_safetensors_errors_do_not_echo_the_header(tmp_path):
    # was: safetensors quoting a 5000-character string from the header in the message
    from toile.families.registry import detect_family
    from toile.io.lora_info import read_header

    path = tmp_path / "long.safetensors"
    path.write_bytes(safetensors_bytes({"t": "x" * 5000}, b""))
    with pytest.raises(ModelFormatError) as info:
        read_header(path)
    assert_clean(info.value, "is not a readable .safetensors file")
    with pytest.raises(ModelFormatError) as info:
        detect_family(path)
    assert_clean(info.value, "cannot tell which model family")


# ----------------------------------------------------------------------- regressions: images


def test_tiff_with_an_undefined_strip_offset(tmp_path):
    # was: TypeError "'bytes' object cannot be interpreted as an integer" from Pillow's load()
    from PIL import Image

    from toile.io.images import load_rgb

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd:ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        if struct.unpack("<H", data[at:at + 2])[0] == 273:  # StripOffsets
            data[at + 2:at + 4] = struct.pack("<H", 7)  # of type UNDEFINED: bytes, not ints
    path = tmp_path / "strip.tif"
    path.write_bytes(data)
    with pytest.raises(ImageInputError) as info:
        load_rgb(str(path))
    assert_clean(info.value, "image: ", str(path), "is a corrupt image file")


@pytest.mark.parametrize(("record", "expected"), [
    ("{", "Expecting property name"),
    ("[]", "'list' object has no attribute 'items'"),
    ('{"prompt": "a"}', "missing"),
    ('{"loras": 5}', "not iterable"),
    ("[" * 100_000 + "]" * 100_000, "maximum recursion depth"),
])
def test_info_with_a_broken_record(tmp_path, record, expected):
    # was: JSONDecodeError / AttributeError / TypeError / RecursionError from `toile info`
    from toile.io.metadata import read_record

    path = tmp_path / "record.png"
    path.write_bytes(png_with_text(toile=record))
    with pytest.raises(ImageInputError) as info:
        read_record(str(path))
    assert_clean(info.value, str(path), "has a toile record that cannot be read", expected)


# ------------------------------------------------------------------- regressions: model folders


def broken_model(targets, tmp_path: Path, name: str, **files: bytes | None) -> Path:
    folder = tmp_path / name
    targets.build(folder, files)
    return folder


@pytest.mark.parametrize(("files", "expected"), [
    # TypeError "unhashable type: 'list'" (flux detection, then check_folder_code)
    ({"model_index.json": b'{"_class_name": ["ToilePipeline"]}'}, "pipeline class is"),
    ({"model_index.json": b'{"_class_name": "ToilePipeline", "unet": [["x"], "U"]}'},
     "names library ['x']"),
    # RecursionError from the JSON readers
    ({"model_index.json": b"[" * 100_000 + b"]" * 100_000}, "is not valid JSON"),
    ({"toile_config.json": b"[" * 100_000 + b"]" * 100_000}, "is not a valid toile config"),
    # diffusers / transformers errors of every kind from a broken component
    ({"unet/config.json": b'{"_class_name": "UNet2DConditionModel", "act_fn": " "}'},
     "cannot load the U-Net in"),
    ({"unet/config.json": b"{"}, "unet/config.json is not valid JSON"),
    # diffusers took a config that is a JSON string for a Hub repository id and tried to
    # download it (local_files_only notwithstanding): minutes of retries offline
    ({"unet/config.json": b'"x"'}, "unet/config.json must hold a JSON object, not str"),
    ({"scheduler/scheduler_config.json": b'"x"'}, "must hold a JSON object, not str"),
    # transformers built 10**30 BERT layers one by one (a hang, then out of memory)
    ({"text/config.json": b'{"model_type": "bert", "hidden_size": 32, "num_hidden_layers": '
                          b'1000000000000000000000000000000}'},
     "gives num_hidden_layers = 1000000000000000000000000000000, but its weights hold only"),
    ({"unet/config.json": b'{"_class_name": "UNet2DConditionModel", "layers_per_block": '
                          b'100000000}'}, "gives layers_per_block = 100000000"),
    ({"text/config.json": b'{"model_type": "bert", "hidden_size": 32, '
                          b'"num_attention_heads": 256}'}, "cannot load the text encoder in"),
    ({"text/tokenizer.json": b'{"normalizer": 1.5}'}, "cannot load the tokenizer in"),
    # NotImplementedError "Cannot copy out of meta tensor" (a tensor missing from the file)
    ("drop-one-unet-tensor", "lacks 1 of the U-Net's tensors"),
])
def test_broken_model_folders(model_targets, tmp_path, files, expected):
    if files == "drop-one-unet-tensor":
        from safetensors.torch import load, save

        name = "unet/diffusion_pytorch_model.safetensors"
        tensors = load((model_targets.seed / name).read_bytes())
        tensors.pop(sorted(tensors)[0])
        files = {name: save(tensors)}
    folder = broken_model(model_targets, tmp_path, "model", **files)
    with pytest.raises(ToileError) as info:
        model_targets.engine.load(str(folder))
    assert_clean(info.value, expected)


# ---------------------------------------------------------------------------------- the CLI


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOILE_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([TOILE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_generate_with_a_crafted_lora(lora_targets, tmp_path, toile_home):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(rewrite_metadata(seed_lora(lora_targets, "toile-lora"),
                                     lora_adapter_metadata='{"unet.r": ['))
    proc = run_cli("generate", "x", "--lora", str(bad), "--steps", "1", "-o",
                   str(tmp_path / "out.png"), home=toile_home)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("toile generate: error: loras.path: ") and str(bad) in lines[0]
    assert not (tmp_path / "out.png").exists()


def test_cli_info_with_a_crafted_png(tmp_path, toile_home):
    bad = tmp_path / "bad.png"
    bad.write_bytes(png_with_text(toile='{"model_id": 1}', parameters="a cat"))
    proc = run_cli("info", str(bad), home=toile_home)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"toile info: error: image: {bad} has a toile record")
    # --a1111 reads only the `parameters` chunk, which is fine
    assert run_cli("info", "--a1111", str(bad), home=toile_home).stdout.strip() == "a cat"


def test_zlib_bomb_in_a_text_chunk(tmp_path):
    # 50 MB of zeros in a 50 kB zTXt chunk: refused by Pillow's text-chunk limit, one line
    from toile.io.images import load_rgb

    data = png_with_text()
    bomb = zlib.compress(b"\0" * (50 << 20), 9)
    payload = b"toile\0\0" + bomb
    chunk = (struct.pack(">I", len(payload)) + b"zTXt" + payload
             + struct.pack(">I", zlib.crc32(b"zTXt" + payload) & 0xFFFFFFFF))
    path = tmp_path / "bomb.png"
    path.write_bytes(data[:33] + chunk + data[33:])  # after the signature and IHDR
    with pytest.raises(ImageInputError) as info:
        load_rgb(str(path))
    assert_clean(info.value, str(path))

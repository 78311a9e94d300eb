"""The real console script in a subprocess: generate, info, models, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import center_mask, gradient_image

TOILE = str(Path(sys.executable).parent / "toile")


def toile(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOILE_HOME=str(home), HF_HUB_OFFLINE="1")
    proc = subprocess.run([TOILE, *args], capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"toile {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def test_help_lists_commands(toile_home):
    out = toile("--help", home=toile_home).stdout
    for command in ("generate", "models", "info"):
        assert command in out


def test_generate_json_info_and_batch(tiny_models, toile_home, tmp_path):
    model = str(tiny_models("sd"))
    out = tmp_path / "cat.png"
    proc = toile(
        "generate",
        "a red cat",
        "--model",
        model,
        "--steps",
        "2",
        "--seed",
        "5",
        "-n",
        "2",
        "-o",
        str(out),
        "--json",
        home=toile_home,
    )
    data = json.loads(proc.stdout)
    assert data["paths"] == [str(tmp_path / "cat-0.png"), str(tmp_path / "cat-1.png")]
    assert [image["seed"] for image in data["images"]] == [5, 6]
    assert data["images"][0]["record"]["steps"] == 2
    assert "generate_s" in data["timings"]
    assert "denoise" in proc.stderr  # the progress bar
    info = json.loads(toile("info", data["paths"][1], home=toile_home).stdout)
    assert info == data["images"][1]["record"]
    a1111 = toile("info", data["paths"][0], "--a1111", home=toile_home).stdout
    assert a1111.startswith("a red cat\nSteps: 2, ") and "Seed: 5" in a1111
    # The second image is what a single run with its recorded seed gives.
    single = tmp_path / "single.png"
    toile(
        "generate",
        "a red cat",
        "--model",
        model,
        "--steps",
        "2",
        "--seed",
        "6",
        "-o",
        str(single),
        home=toile_home,
    )
    a = np.asarray(Image.open(single), dtype=int)
    b = np.asarray(Image.open(data["paths"][1]), dtype=int)
    assert np.abs(a - b).max() <= 2



def test_generate_with_an_sdxl_refiner(tiny_models, toile_home, tmp_path):
    base, refiner = str(tiny_models("sdxl")), str(tiny_models("sdxl_refiner"))
    out = tmp_path / "refined.png"
    args = ("generate", "a red cat", "--model", base, "--refiner", refiner, "--steps", "4",
            "--seed", "2", "-o", str(out), "--json")
    data = json.loads(toile(*args, "--refiner-switch", "0.5", home=toile_home).stdout)
    record = data["images"][0]["record"]
    assert (record["refiner_id"], record["refiner_switch"]) == (refiner, 0.5)
    assert "Refiner switch at: 0.5" in toile("info", str(out), "--a1111", home=toile_home).stdout
    bad = toile(*args, "--refiner-switch", "1", home=toile_home, check=False)
    assert bad.returncode != 0 and "refiner_switch" in bad.stderr

def test_models_add_list_and_generate_by_id(tiny_models, toile_home, tmp_path):
    toile("models", "add", "tiny-sd", str(tiny_models("sd")), home=toile_home)
    listing = json.loads(toile("models", "--json", home=toile_home).stdout)
    row = next(m for m in listing["models"] if m["id"] == "tiny-sd")
    assert row["family"] == "sd"
    out = tmp_path / "by-id.png"
    toile(
        "generate", "a cat", "--model", "tiny-sd", "--steps", "1", "-o", str(out), home=toile_home
    )
    assert Image.open(out).size == (32, 32)


def test_inpaint_and_outpaint_from_files(tiny_models, toile_home, tmp_path):
    model = str(tiny_models("sd"))
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    gradient_image(32, 32).save(image)
    center_mask(32, 32).save(mask)
    out = tmp_path / "inpainted.png"
    toile(
        "generate",
        "a cat",
        "--model",
        model,
        "--steps",
        "2",
        "--image",
        str(image),
        "--mask",
        str(mask),
        "-o",
        str(out),
        home=toile_home,
    )
    result = np.asarray(Image.open(out))
    keep = np.asarray(Image.open(mask)) < 128
    assert np.array_equal(result[keep], np.asarray(Image.open(image))[keep])
    out2 = tmp_path / "outpainted.png"
    toile(
        "generate",
        "a cat",
        "--model",
        model,
        "--steps",
        "2",
        "--image",
        str(image),
        "--outpaint",
        "8,0,8,0",
        "-o",
        str(out2),
        home=toile_home,
    )
    assert Image.open(out2).size == (48, 32)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "steps: must be an integer in [1, 1000]"),
        (["--model", "nope"], "unknown model id 'nope'"),
        (["--width", "33"], "width: 33 must be a multiple of 2"),
        (["--mask", "m.png"], "image: --mask needs an input image"),
        (["--image", "missing.png"], "image: file not found"),
        (["--lora", "style.ckpt"], "pickle files can run arbitrary code"),
        (["--outpaint", "1,2"], "outpaint: expected LEFT,TOP,RIGHT,BOTTOM"),
    ],
)
def test_errors_are_clear(tiny_models, toile_home, tmp_path, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_models("sd"))]
    if "style.ckpt" in args:
        (tmp_path / "style.ckpt").write_bytes(b"x")
        args[args.index("style.ckpt")] = str(tmp_path / "style.ckpt")
    proc = (
        toile(
            "generate",
            "a cat",
            "--steps",
            "1",
            *args,
            "-o",
            str(tmp_path / "x.png"),
            home=toile_home,
            check=False,
        )
        if "--steps" not in args
        else toile(
            "generate", "a cat", *args, "-o", str(tmp_path / "x.png"), home=toile_home, check=False
        )
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_reports_loads_and_the_direct_call_baseline(toile_home):
    # The built-in model (the default), at 2 steps: what `toile bench` is for, kept short.
    proc = toile("bench", "--runs", "2", "--steps", "2", "--json", home=toile_home)
    result = json.loads(proc.stdout)
    assert result["family"] == "toile" and result["runs"] == 2
    assert result["settings"]["steps"] == 2
    assert result["cold_load_s"] > 0 and result["load_s"] > 0
    for side in ("engine", "direct_family_call"):
        stats = result[side]
        assert 0 < stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    assert result["engine_overhead_ratio"] > 0 and result["peak_rss_mb"] > 0
    assert (result["settings"]["width"], result["settings"]["height"]) == (256, 256)  # cascade
    # --vs: a second model interleaved, the same settings, the ratio of the medians
    proc = toile("bench", "--runs", "2", "--steps", "2", "--width", "64", "--height", "64",
                 "--vs", "toile-mini", "--json", home=toile_home)
    result = json.loads(proc.stdout)
    assert result["vs"]["model"] == "toile-mini" and result["settings"]["width"] == 64
    low, high = result["vs"]["ratio_range"]
    assert 0 < low <= result["vs"]["ratio_of_medians"] <= high
    bad = toile("bench", "--runs", "0", home=toile_home, check=False)
    assert bad.returncode != 0 and "runs" in bad.stderr

"""Fine-tuning's inputs and outputs: bad data (clear errors or counted skips, never a crash
halfway), captions, prior preservation through the engine, bucketing, the CLI, the LoRA file's
metadata and the LoRA registry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune_common import PROMPT, make_images, train
from toile.errors import RequestError


@pytest.fixture(scope="module")
def sd(tiny_models):
    return tiny_models("sd")


def add_bad_files(folder: Path) -> None:
    (folder / "garbage.png").write_bytes(b"this is not a png")
    png = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.new("RGB", (4, 4), "red").save(folder / "tiny.png")


def test_bad_images_are_counted_skips(sd, tmp_path):
    from toile.train.finetune.dataset import load_image_set

    images = make_images(tmp_path / "images")
    add_bad_files(images)
    data = load_image_set(images, prompt=PROMPT, resolution=32, multiple=8)
    assert len(data) == 4
    assert data.skips.counts == {"unreadable image": 2, "smaller than 8 px": 1}
    assert "garbage.png" in data.skips.summary() and "tiny.png" in data.skips.summary()
    result = train(sd, images, tmp_path / "lora.safetensors", steps=2, batch_size=2)
    assert result.steps == 2 and result.skipped["total"] == 3


def test_missing_caption_without_prompt_names_prompt(tmp_path):
    from toile.train.finetune.dataset import load_image_set

    images = make_images(tmp_path / "images")
    with pytest.raises(RequestError, match=r"prompt: 4 of 4 images .* no caption file.*--prompt"):
        load_image_set(images, prompt=None, resolution=32, multiple=8)
    for i in range(3):  # one image left without a caption is still an error
        (images / f"img{i}.txt").write_text("a caption")
    with pytest.raises(RequestError, match=r"prompt: 1 of 4 images .*img3.png"):
        load_image_set(images, prompt=None, resolution=32, multiple=8)
    (images / "img3.txt").write_text("  the last\ncaption  \n")
    data = load_image_set(images, prompt=None, resolution=32, multiple=8)
    assert [e.caption for e in data.examples] == ["a caption"] * 3 + ["the last caption"]


def test_caption_files_win_over_the_prompt(tmp_path):
    from toile.train.finetune.dataset import load_image_set

    images = make_images(tmp_path / "images", captions=True)
    (images / "img0.txt").unlink()
    data = load_image_set(images, prompt="fallback", resolution=32, multiple=8)
    assert [e.caption for e in data.examples] == ["fallback"] + [
        f"{PROMPT} number {i}" for i in (1, 2, 3)
    ]


def test_nothing_usable_is_an_error_naming_the_folder(tmp_path):
    from toile.train.finetune.dataset import load_image_set

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RequestError, match="images: no usable images in .*empty"):
        load_image_set(empty, prompt=PROMPT, resolution=32, multiple=8)
    Image.new("RGB", (4, 4)).save(empty / "tiny.png")
    with pytest.raises(RequestError, match="smaller than 8 px"):
        load_image_set(empty, prompt=PROMPT, resolution=32, multiple=8)
    with pytest.raises(RequestError, match="images: .* is not a folder"):
        load_image_set(tmp_path / "nope", prompt=PROMPT, resolution=32, multiple=8)


def test_config_errors_name_the_field(tmp_path):
    from toile.train.finetune.config import FinetuneConfig

    with pytest.raises(RequestError, match="out: a LoRA is saved as one .safetensors file"):
        FinetuneConfig(images=str(tmp_path), out=str(tmp_path / "lora"))
    with pytest.raises(RequestError, match="class_prompt: prior preservation needs"):
        FinetuneConfig(images="x", out="x.safetensors", prior_preservation=True)
    with pytest.raises(RequestError, match="rank: must be an integer"):
        FinetuneConfig(images="x", out="x.safetensors", rank=0)


def test_buckets_keep_non_square_images(sd, tmp_path):
    from toile.train.finetune.dataset import load_image_set

    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(64, 32), (64, 32), (32, 64), (40, 40)]):
        Image.fromarray(np.full((size[1], size[0], 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    data = load_image_set(images, prompt=PROMPT, resolution=32, multiple=8, buckets=True)
    sizes = [e.image.size for e in data.examples]
    assert sizes[0][0] > sizes[0][1] and sizes[2][0] < sizes[2][1] and sizes[3] == (32, 32)
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in sizes)
    result = train(sd, images, tmp_path / "lora.safetensors", steps=3, batch_size=2,
                   buckets=True)
    assert result.steps == 3


def test_prior_preservation_generates_and_caches_class_images(sd, tmp_path):
    images = make_images(tmp_path / "images")
    out = tmp_path / "lora.safetensors"
    prior = {"prior_preservation": True, "class_prompt": "a square", "num_class_images": 2,
             "class_steps": 2, "steps": 2, "batch_size": 2}
    train(sd, images, out, **prior)
    folder = tmp_path / "lora.safetensors.class-images"
    made = sorted(folder.glob("class-*.png"))
    assert [p.name for p in made] == ["class-00000.png", "class-00001.png"]
    stamps = [p.stat().st_mtime_ns for p in made]
    train(sd, images, out, **prior)  # reused, not generated again
    assert [p.stat().st_mtime_ns for p in made] == stamps
    info = json.loads((folder / "class-images.json").read_text())
    assert info["class_prompt"] == "a square"


def test_class_data_folder_is_the_prior_set(sd, tmp_path):
    """--class-data: the user's captioned class images (kohya's regularization folder) are
    trained on alongside, are checked like training images, and pin --resume."""
    from toile.cli.finetune_cmd import add_arguments, config_from_args
    from toile.io.lora_info import read_lora_info

    images = make_images(tmp_path / "images")
    classes = make_images(tmp_path / "classes", n=3, captions=True)
    (classes / "img2.txt").unlink()
    out = tmp_path / "lora.safetensors"
    with pytest.raises(RequestError, match=r"class_prompt: 1 of 3 images .* --class-prompt"):
        train(sd, images, out, prior_preservation=True, class_data=str(classes), steps=1)
    with pytest.raises(RequestError, match="class_data: class images are only used with prior"):
        train(sd, images, out, class_data=str(classes), steps=1)

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--images", str(images), "--out", str(out), "--class-data",
                              str(classes), "--class-prompt", "a square"])
    assert config_from_args(args).prior_preservation  # the flag turns the prior on

    plain = train(sd, images, tmp_path / "plain.safetensors", steps=2, batch_size=2)
    prior = {"prior_preservation": True, "class_data": str(classes), "class_prompt": "a square",
             "batch_size": 2, "checkpoint_every": 1}
    result = train(sd, images, out, steps=2, **prior)
    assert result.losses != plain.losses  # the class images' loss is part of the objective
    assert read_lora_info(out)["class_images"] == 3
    assert not Path(str(out) + ".class-images").exists()  # nothing generated

    Image.new("RGB", (40, 40), "blue").save(classes / "img3.png")
    with pytest.raises(RequestError, match="resume: .* the class images or their captions"):
        train(sd, images, out, steps=3, resume=True, **prior)


def write_shard(path: Path, images: Path) -> Path:
    """A WebDataset shard of ``images`` (each ``NAME.png`` + ``NAME.txt``)."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for image in sorted(images.glob("*.png")):
            tar.add(image, arcname=image.name)
            if image.with_suffix(".txt").is_file():
                tar.add(image.with_suffix(".txt"), arcname=image.with_suffix(".txt").name)
    return path


def test_streamed_images_shards_and_big_folders(sd, tmp_path):
    """WebDataset shards as --images are streamed (and --stream streams a folder): the loss is
    finite, uncaptioned samples take --prompt, --resume continues bit for bit, and the LoRA
    records that its images were streamed."""
    from finetune_common import check_resume_is_exact
    from toile.io.lora_info import read_lora_info

    images = make_images(tmp_path / "images", n=6, captions=True)
    (images / "img5.txt").unlink()  # this one takes --prompt
    shard = write_shard(tmp_path / "data-00000.tar", images)
    out = tmp_path / "lora.safetensors"
    result = train(sd, shard, out, steps=3, batch_size=2)
    assert result.steps == 3 and all(np.isfinite(result.losses))
    assert read_lora_info(out)["images"] == "streamed"
    check_resume_is_exact(sd, shard, tmp_path / "resume")
    folder = train(sd, images, tmp_path / "folder.safetensors", steps=2, batch_size=2,
                   stream=True, prompt=None)
    assert folder.steps == 2
    assert folder.skipped["by_reason"] == {"missing caption": 1}  # img5 without --prompt
    with pytest.raises(RequestError, match="images: .* gave no full batch of 8"):
        train(sd, shard, tmp_path / "big.safetensors", steps=1, batch_size=8)


def test_lora_metadata_and_diffusers_layout(sd, tmp_path):
    from safetensors import safe_open

    from toile.io.lora_info import read_lora_info

    images = make_images(tmp_path / "images")
    out = tmp_path / "lora.safetensors"
    train(sd, images, out, steps=2, batch_size=2, rank=2)
    info = read_lora_info(out)
    assert info["base_model"] == str(sd) and len(info["base_model_hash"]) == 64
    assert (info["method"], info["rank"], info["steps"], info["prompt"]) == ("lora", 2, 2, PROMPT)
    assert info["lr"] == 1e-2 and info["family"] == "sd" and "toile_version" in info
    with safe_open(str(out), framework="pt") as handle:
        keys = list(handle.keys())
        adapters = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert adapters["unet.r"] == 2 and adapters["unet.lora_alpha"] == 2


def test_cli_finetune_and_loras_registry(sd, tmp_path, capsys):
    from toile.cli.main import main
    from toile.engine.models import LoraRegistry

    images = make_images(tmp_path / "images")
    out = tmp_path / "cli.safetensors"
    assert main(["finetune", "--model", str(sd), "--images", str(images), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--no-progress", "--json"]) == 2
    assert "prompt: 4 of 4 images" in capsys.readouterr().err
    code = main(["finetune", "--model", str(sd), "--images", str(images), "--out", str(out),
                 "--prompt", PROMPT, "--steps", "2", "--batch-size", "2", "--no-progress",
                 "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["steps"] == 2 and out.is_file()

    server_side = LoraRegistry()  # what a running server holds
    assert server_side.entries() == []
    assert main(["loras", "add", "square", str(out)]) == 0
    assert server_side.entries() == []  # a snapshot ...
    assert [e.id for e in server_side.reload()] == ["square"]  # ... until the admin reloads
    spec = server_side.spec("square", 0.5)
    assert spec.path == str(out.resolve()) and spec.scale == 0.5
    capsys.readouterr()
    assert main(["loras", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["loras"][0]
    assert listed["id"] == "square" and listed["family"] == "sd" and listed["steps"] == 2
    with pytest.raises(RequestError, match="loras: unknown LoRA id 'nope'"):
        server_side.spec("nope")
    assert main(["loras", "add", "bad", str(tmp_path / "x.ckpt")]) == 2
    assert main(["loras", "remove", "square"]) == 0
    assert server_side.reload() == []

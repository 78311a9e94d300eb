"""The task commands end to end through the console script, on tiny random models:
``toile caption`` (files, folders, --write-txt, --overwrite), ``toile ask``, ``toile edit``,
and ``toile finetune --caption-with``."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from finetune_common import make_images, make_tiny_toile
from helpers import gradient_image
from test_cli import toile
from toile.engine.engine import Engine
from toile.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def engine_text(model, **fields) -> str:
    image = Image.open(fields.pop("path")).convert("RGB")
    return Engine(policy=None).run(GenerationRequest(
        prompt="", model=str(model), image=image, **fields)).texts[0]


def test_caption_files_folders_and_txt(tiny_models, toile_home, tmp_path):
    blip = tiny_models("blip")
    folder = make_images(tmp_path / "set", n=3, size=32)
    (folder / "sub").mkdir()
    gradient_image(32, 32).save(folder / "sub" / "deep.png")
    single = folder / "img0.png"
    expected = engine_text(blip, task="caption", path=single)
    out = toile("caption", str(single), "--model", str(blip), home=toile_home).stdout
    assert out.strip().splitlines()[-1] == expected
    long = toile("caption", str(single), "--long", "--model", str(blip), home=toile_home)
    assert long.stdout.strip() == engine_text(blip, task="caption", detail="long", path=single)

    (folder / "img1.txt").write_text("mine\n")
    proc = toile("caption", str(folder), "--write-txt", "--model", str(blip), home=toile_home)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and "skipped" in lines[1]
    assert (folder / "img1.txt").read_text() == "mine\n"  # kept without --overwrite
    assert (folder / "img0.txt").read_text().strip() == expected
    assert (folder / "sub" / "deep.txt").is_file()
    toile("caption", str(folder), "--write-txt", "--overwrite", "--model", str(blip),
          home=toile_home)
    assert (folder / "img1.txt").read_text() != "mine\n"
    data = json.loads(toile("caption", str(single), "--json", "--model", str(blip),
                            home=toile_home).stdout)
    assert data["captions"][0]["caption"] == expected
    assert data["captions"][0]["record"]["task"] == "caption"
    bad = toile("caption", str(single), "--overwrite", "--model", str(blip), home=toile_home,
                check=False)
    assert bad.returncode == 2 and "overwrite" in bad.stderr
    gen = toile("caption", str(single), "--model", str(tiny_models("sd")), home=toile_home,
                check=False)
    assert gen.returncode == 2 and "caption task is not supported" in gen.stderr


def test_ask(tiny_models, toile_home, tmp_path):
    vqa = tiny_models("blip_vqa")
    image = tmp_path / "q.png"
    gradient_image(32, 32).save(image)
    question = "how many squares are there?"
    out = toile("ask", str(image), question, "--model", str(vqa), home=toile_home).stdout
    assert out.strip() == engine_text(vqa, task="answer", question=question, path=image)
    long = toile("ask", str(image), "x" * 1001, "--model", str(vqa), home=toile_home,
                 check=False)
    assert long.returncode == 2 and "question" in long.stderr and long.stderr.count("\n") == 1


def test_edit(tiny_models, toile_home, tmp_path):
    model = tiny_models("sd_ip2p")
    image = tmp_path / "in.png"
    gradient_image(35, 29).save(image)
    out = tmp_path / "out.png"
    proc = toile("edit", str(image), "make it blue", "--model", str(model), "--steps", "2",
                 "--seed", "4", "--image-guidance", "1.2", "-o", str(out), "--json",
                 home=toile_home)
    record = json.loads(proc.stdout)["images"][0]["record"]
    assert (record["task"], record["mode"], record["prompt"]) == ("edit", "edit", "make it blue")
    assert record["image_guidance"] == 1.2
    assert Image.open(out).size == (34, 28)  # rounded down to the model's multiple (2)
    from toile.io.metadata import read_record

    assert read_record(str(out)).task == "edit"


def test_finetune_caption_with_writes_missing_captions(tiny_models, tmp_path):
    from toile.cli.finetune_cmd import caption_uncaptioned

    images = make_images(tmp_path / "ft", n=3, size=32)
    (images / "img2.txt").write_text("a photo of sks square\n")
    written = caption_uncaptioned(str(images), str(tiny_models("blip")), progress=False)
    assert written == 2
    assert (images / "img2.txt").read_text() == "a photo of sks square\n"
    assert (images / "img0.txt").read_text().strip()
    assert caption_uncaptioned(str(images), str(tiny_models("blip")), progress=False) == 0


def test_finetune_cli_caption_with(tiny_models, toile_home, tmp_path, text_folder):
    model = make_tiny_toile(tmp_path / "model", text_folder)
    images = make_images(tmp_path / "ft", n=2, size=24)
    proc = toile("finetune", "--model", str(model), "--images", str(images), "--out",
                 str(tmp_path / "lora.safetensors"), "--steps", "1", "--caption-with",
                 str(tiny_models("blip")), "--no-progress", "--json", home=toile_home)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 1
    assert (images / "img0.txt").is_file() and (images / "img1.txt").is_file()

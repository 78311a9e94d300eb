"""The reader family: captions and answers from BLIP, BLIP-VQA, BLIP-2 and a LLaVA-style VLM.

Parity: toile's text equals the model's own ``generate`` on the inputs its processor makes
(documented usage: ``processor(images, text)``, or the chat template for a VLM) with greedy
decoding and the same token budget, decoded without special tokens.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from toile.engine.engine import Engine
from toile.errors import (
    CancelledError,
    ModelFormatError,
    RequestError,
    UnsafeFileError,
    UnsupportedModeError,
)
from toile.families.reader import ReaderFamily
from toile.families.registry import detect_family
from toile.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTION = "what color is the cat?"
MODEL_CLASSES = {"blip": "BlipForConditionalGeneration", "blip_vqa": "BlipForQuestionAnswering",
                 "blip2": "Blip2ForConditionalGeneration", "vlm": "AutoModelForImageTextToText"}


def chat(instruction: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": instruction}]}]


# (fixture, task, detail, what the model is given, max_new_tokens, whether the output repeats
# the prompt): a string is processor text, a list is a chat, None is the image alone.
CASES = [
    ("blip", "caption", "short", None, 30, False),
    ("blip", "caption", "long", "a picture of", 120, False),
    ("blip_vqa", "answer", "short", QUESTION, 120, False),
    ("blip2", "caption", "short", None, 30, True),
    ("blip2", "caption", "long", "Question: Describe this image in detail. Answer:", 120, True),
    ("blip2", "answer", "short", f"Question: {QUESTION} Answer:", 120, True),
    ("vlm", "caption", "short", chat("Describe this image in one sentence."), 30, True),
    ("vlm", "caption", "long", chat("Describe this image in detail."), 120, True),
    ("vlm", "answer", "short", chat(QUESTION), 120, True),
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(policy=None, device="cpu", cache_size=4)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    # A picture with structure (not one colour), at a size the processors must resize.
    picture = Image.new("RGB", (48, 40), (200, 40, 30))
    picture.paste((20, 90, 220), (10, 8, 30, 28))
    return picture


def ask(engine: Engine, folder: Path, image: Image.Image, task: str, **extra: Any):
    return engine.run(GenerationRequest(prompt="", task=task, image=image, model=str(folder),
                                        **extra))


def reference(folder: Path, name: str, image: Image.Image, given: Any, budget: int,
              echoes: bool) -> str:
    """What the model's own ``generate`` writes, with transformers' documented usage."""
    import torch
    import transformers
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = getattr(transformers, MODEL_CLASSES[name]).from_pretrained(
        folder, local_files_only=True).eval()
    if isinstance(given, list):
        prompt = processor.apply_chat_template(given, add_generation_prompt=True)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    else:
        inputs = processor(images=image, text=given, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=budget, do_sample=False, num_beams=1)
    start = inputs["input_ids"].shape[1] if echoes and "input_ids" in inputs else 0
    return processor.decode(output[0][start:], skip_special_tokens=True).strip()


@pytest.mark.parametrize(("name", "task", "detail", "given", "budget", "echoes"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_text_equals_the_models_own_generate(
    tiny_models, engine: Engine, image: Image.Image, name: str, task: str, detail: str,
    given: Any, budget: int, echoes: bool,
) -> None:
    folder = tiny_models(name)
    extra = {"question": QUESTION} if task == "answer" else {"detail": detail}
    result = ask(engine, folder, image, task, seed=5, num_images=2, **extra)
    expected = reference(folder, name, image, given, budget, echoes)
    assert expected  # the tiny models write visible tokens: the comparison is of words
    assert result.texts == [expected, expected]  # greedy: every seed gets the same text
    assert [r.text for r in result.records] == result.texts
    assert [r.seed for r in result.records] == [5, 6]
    assert result.images == []


def test_detection_and_variants(tiny_models) -> None:
    from toile.engine.models import served_tasks

    expected = {"blip": ("blip", {"caption"}), "blip_vqa": ("blip-vqa", {"answer"}),
                "blip2": ("blip-2", {"caption", "answer"}), "vlm": ("vlm", {"caption", "answer"})}
    for name, (variant, tasks) in expected.items():
        family = detect_family(tiny_models(name))
        assert family.name == "reader"
        assert family.variant(tiny_models(name)) == variant
        assert {t.value for t in served_tasks(tiny_models(name))} == tasks
    assert set(ReaderFamily.capabilities) == {"blip", "blip-vqa", "blip-2", "vlm"}


def test_diffusers_and_unknown_folders_are_not_claimed(tmp_path: Path) -> None:
    config = {"architectures": ["BlipForConditionalGeneration"], "model_type": "blip"}
    diffusers = tmp_path / "diffusers"
    diffusers.mkdir()
    (diffusers / "config.json").write_text(json.dumps(config))
    (diffusers / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    family = ReaderFamily()
    assert not any(family.detect(folder) for folder in (diffusers, other, broken))


def test_a_generate_request_is_refused_naming_the_task(tiny_models, engine: Engine) -> None:
    with pytest.raises(UnsupportedModeError, match=r"txt2img .*reader.*supports: caption"):
        engine.run(GenerationRequest(prompt="a red cat", model=str(tiny_models("blip"))))


def test_a_caption_model_cannot_answer(tiny_models, engine: Engine, image) -> None:
    with pytest.raises(UnsupportedModeError, match="answer task") as caught:
        ask(engine, tiny_models("blip"), image, "answer", question=QUESTION)
    assert caught.value.field == "task"


@pytest.mark.parametrize("question", [None, "  ", "x" * 1001])
def test_answer_needs_a_short_question(image, question: str | None) -> None:
    with pytest.raises(RequestError) as caught:
        GenerationRequest(prompt="", task="answer", image=image, question=question)
    assert caught.value.field == "question"


def test_records_say_what_was_read(tiny_models, engine: Engine, image) -> None:
    answer = ask(engine, tiny_models("vlm"), image, "answer", question=QUESTION).records[0]
    caption = ask(engine, tiny_models("vlm"), image, "caption", detail="long").records[0]
    assert (answer.task, answer.mode, answer.question, answer.detail) == (
        "answer", "answer", QUESTION, None)
    assert (caption.task, caption.question, caption.detail) == ("caption", None, "long")
    assert answer.inputs == caption.inputs and len(answer.inputs["image"]) == 64
    assert (answer.family, answer.variant, answer.steps, answer.sampler) == ("reader", "vlm", 0, "")


def test_progress_and_cancellation(tiny_models, engine: Engine, image) -> None:
    events = []
    engine.run(GenerationRequest(prompt="", task="caption", image=image,
                                 model=str(tiny_models("blip"))), progress=events.append)
    assert [(e.step, e.total, e.stage) for e in events] == [(1, 1, "read")]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        engine.run(GenerationRequest(prompt="", task="caption", image=image,
                                     model=str(tiny_models("blip"))), cancel=cancel)


def copy_of(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def add_auto_map(path: Path) -> None:
    data = json.loads(path.read_text())
    data["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.EvilModel"}
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("config", ["config.json", "tokenizer_config.json",
                                    "processor_config.json"])
def test_remote_code_is_refused(tiny_models, tmp_path: Path, image, config: str) -> None:
    folder = copy_of(tiny_models("vlm"), tmp_path / "vlm")
    add_auto_map(folder / config)
    with pytest.raises(UnsafeFileError, match=rf"{config} has `auto_map`.*remote code.*never"):
        ask(Engine(policy=None, device="cpu"), folder, image, "caption")


def test_an_unknown_architecture_asking_for_remote_code_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MiniCustomVLM"], "model_type": "mini_custom",
        "auto_map": {"AutoModel": "modeling_custom.MiniCustomVLM"}}))
    family = detect_family(folder)  # claimed, so the refusal gives its reason
    with pytest.raises(UnsafeFileError, match="remote code"):
        family.variant(folder)


def test_pickle_weights_are_refused(tiny_models, tmp_path: Path, image) -> None:
    folder = copy_of(tiny_models("blip"), tmp_path / "blip")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(UnsafeFileError, match=r"pytorch_model\.bin.*pickle"):
        ask(Engine(policy=None, device="cpu"), folder, image, "caption")


def test_a_vlm_without_chat_template_says_what_is_missing(tiny_models, tmp_path: Path,
                                                          image) -> None:
    folder = copy_of(tiny_models("vlm"), tmp_path / "vlm")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ModelFormatError, match="no chat template"):
        ask(Engine(policy=None, device="cpu"), folder, image, "caption")

"""Image-to-text: captions and answers from transformers models in local folders.

BLIP (its captioning and its VQA heads), BLIP-2, and vision-language models that transformers
loads natively through ``AutoModelForImageTextToText`` (LLaVA-style: a user message holding the
image and an instruction, formatted by the folder's own chat template). Weights are safetensors
only, and a folder that asks for remote code (``auto_map`` in a config) is refused: toile never
runs code that comes with a model.

Decoding is greedy (no sampling, one beam), so a caption is reproducible: the text equals the
model's own ``generate`` on the same inputs with the same settings, and every seed of a request
gets the same text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from toile.errors import ModelFormatError, UnsafeFileError
from toile.families.base import LoadedModel
from toile.io.weights import (
    CONVERT_HINT,
    PICKLE_SUFFIXES,
    check_folder_code,
    check_layer_counts,
    read_json_object,
)
from toile.request import Detail, Mode, Task
from toile.resolve import FamilyDefaults

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import BatchFeature, StoppingCriteriaList

    from toile.progress import RunContext
    from toile.request import GenerationRequest
    from toile.resolve import ResolvedRequest

# Token budgets of greedy decoding. A one-sentence caption is 10-20 tokens, so 30 never cuts
# one short; a long description is a paragraph. An answer gets the long budget: BLIP-VQA and
# BLIP-2 stop after a few words anyway, and a VLM may explain. (An answer does not depend on
# ``detail``, which records keep for captions only, so a record says everything that ran.)
MAX_NEW_TOKENS = {Detail.SHORT: 30, Detail.LONG: 120}
ANSWER_TOKENS = 120

# BLIP has no long-caption mode; given text, its decoder continues it. "a picture of" is the
# prompt its captioning head was fine-tuned with, so it continues into a full sentence (kept in
# the caption: it is the sentence's start), with the long budget to run on.
BLIP_LONG_PROMPT = "a picture of"
# BLIP-2's zero-shot VQA prompt (from its paper); a long caption is asked as a question.
BLIP2_QUESTION = "Question: {question} Answer:"
BLIP2_DESCRIBE = "Describe this image in detail."
# A VLM's instructions, sent as a user message after the image.
VLM_INSTRUCTIONS = {Detail.SHORT: "Describe this image in one sentence.",
                    Detail.LONG: "Describe this image in detail."}

# The files transformers' Auto classes read a class (``auto_map``) or code from.
CONFIG_FILES = ("config.json", "processor_config.json", "preprocessor_config.json",
                "tokenizer_config.json", "video_preprocessor_config.json")


class Prompting(enum.Enum):
    """How a model is asked: the shape of its inputs and of its output."""

    BLIP = "blip"  # an image (and a caption prefix); the output starts with the prefix
    BLIP_VQA = "blip-vqa"  # an image and the question; the output is the answer alone
    BLIP2 = "blip-2"  # an image and a "Question: ... Answer:" prompt, echoed in the output
    CHAT = "chat"  # the folder's chat template; the output echoes the prompt


@dataclass(frozen=True)
class ReaderSpec:
    """One architecture toile reads with: its variant name, the modes it serves, the
    transformers class that loads it, and how it is prompted."""

    variant: str
    modes: frozenset[Mode]
    model_class: str
    prompting: Prompting


CAPTION = frozenset({Mode.CAPTION})
ANSWER = frozenset({Mode.ANSWER})
BOTH = CAPTION | ANSWER
VLM = ReaderSpec("vlm", BOTH, "AutoModelForImageTextToText", Prompting.CHAT)

# config.json's ``architectures`` entry -> how to read with it.
ARCHITECTURES: dict[str, ReaderSpec] = {
    "BlipForConditionalGeneration": ReaderSpec(
        "blip", CAPTION, "BlipForConditionalGeneration", Prompting.BLIP),
    "BlipForQuestionAnswering": ReaderSpec(
        "blip-vqa", ANSWER, "BlipForQuestionAnswering", Prompting.BLIP_VQA),
    "Blip2ForConditionalGeneration": ReaderSpec(
        "blip-2", BOTH, "Blip2ForConditionalGeneration", Prompting.BLIP2),
    "LlavaForConditionalGeneration": VLM,
}
# ``model_type`` -> architecture, for a config.json without ``architectures``; only where the
# type names one architecture ("blip" is both captioning and VQA, so it is not here).
MODEL_TYPES = {"blip-2": "Blip2ForConditionalGeneration", "llava": "LlavaForConditionalGeneration"}


@dataclass(frozen=True)
class Reader:
    """A loaded model with its processor: what ``LoadedModel.pipelines`` holds per mode."""

    model: Any
    processor: Any
    spec: ReaderSpec


def find_auto_map(folder: Path) -> str | None:
    """The first config file of ``folder`` that names remote code (an ``auto_map`` anywhere
    in it), or None."""
    for name in CONFIG_FILES:
        path = folder / name
        if path.is_file() and _has_key(read_json_object(path), "auto_map"):
            return name
    return None


def _has_key(data: Any, key: str) -> bool:
    """Whether ``key`` is a key of ``data`` or of any object nested in it (iterative: a
    config's nesting depth is the file's choice)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if key in item:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def refuse_remote_code(folder: Path) -> None:
    name = find_auto_map(folder)
    if name is not None:
        raise UnsafeFileError(
            f"refusing to load {folder}: its {name} has `auto_map`, so the folder asks for "
            "remote code (its own Python classes), which toile never runs; use a model that "
            "transformers supports natively")


def _config(folder: Path) -> dict[str, Any] | None:
    """config.json of a transformers folder, or None (not one, or unreadable)."""
    path = folder / "config.json"
    if not folder.is_dir() or (folder / "model_index.json").exists() or not path.is_file():
        return None
    try:
        return read_json_object(path)
    except ModelFormatError:
        return None


def spec_of(config: dict[str, Any]) -> ReaderSpec | None:
    """The spec of the first architecture config.json names that toile reads with."""
    architectures = config.get("architectures")
    names = [a for a in architectures if isinstance(a, str)] if isinstance(
        architectures, list) else []
    model_type = config.get("model_type")
    if not names and isinstance(model_type, str) and model_type in MODEL_TYPES:
        names = [MODEL_TYPES[model_type]]
    return next((ARCHITECTURES[name] for name in names if name in ARCHITECTURES), None)


def check_weights(folder: Path) -> None:
    """Safetensors weights must be there; pickle ones are refused (transformers would fall
    back to ``torch.load``); a config's layer counts must fit its weights."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeFileError(f"refusing to load {folder / pickles[0]}: {CONVERT_HINT}")
        raise ModelFormatError(f"missing weights: no *.safetensors file in {folder}")
    config = read_json_object(folder / "config.json")
    for part in (config, *(v for v in config.values() if isinstance(v, dict))):
        check_layer_counts(part, folder / "config.json", weights)


class ReaderFamily:
    name = "reader"
    title = "Image-to-text (BLIP, BLIP-2, vision-language models)"
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {
        spec.variant: spec.modes for spec in ARCHITECTURES.values()}
    lora = False
    # Vision-language models are trained in bfloat16, and some overflow float16.
    gpu_dtype = "bfloat16"

    def detect(self, path: Path) -> bool:
        """A transformers folder (config.json, no model_index.json) of a known architecture —
        or one that asks for remote code, claimed so that loading it says why it is refused."""
        config = _config(path)
        return config is not None and (spec_of(config) is not None or _has_key(
            config, "auto_map"))

    def variant(self, path: Path) -> str:
        return self._spec(path).variant

    def _spec(self, path: Path) -> ReaderSpec:
        refuse_remote_code(path)
        config = read_json_object(path / "config.json")
        spec = spec_of(config)
        if spec is None:
            raise ModelFormatError(
                f"{path / 'config.json'} names architectures {config.get('architectures')!r}; "
                f"the reader family reads {', '.join(ARCHITECTURES)}")
        return spec

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        import transformers
        from transformers import AutoProcessor

        spec = self._spec(path)
        check_folder_code(path)
        check_weights(path)
        model_class = getattr(transformers, spec.model_class)
        model = model_class.from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False,
            dtype=dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(path, local_files_only=True,
                                                  trust_remote_code=False)
        reader = Reader(model, processor, spec)
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=FamilyDefaults(modes=spec.modes, width=0, height=0, steps=0,
                                    guidance=0.0, size_multiple=1, min_side=1),
            device=device,
            dtype=dtype,
            pipelines=dict.fromkeys(spec.modes, reader),
            variant=spec.variant,
        )

    def read(self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext) -> list[str]:
        """The caption or answer, once: greedy decoding writes the same text for every seed."""
        import torch

        ctx.check_cancelled()
        reader: Reader = loaded.pipelines[request.mode]
        assert request.request.image is not None  # GenerationRequest checked it
        image = request.request.image.convert("RGB")
        inputs, max_new_tokens = model_inputs(reader, image, request.request)
        inputs = inputs.to(loaded.device, dtype=loaded.dtype)  # casts floating tensors only
        with torch.inference_mode():
            output = reader.model.generate(
                **inputs, **greedy(max_new_tokens), stopping_criteria=cancel_check(ctx))
        text = decode(reader, inputs, output)
        ctx.on_step(1, 1, stage="read")
        return [text] * len(request.seeds)


def greedy(max_new_tokens: int) -> dict[str, Any]:
    """The decoding settings: greedy, so the same image gives the same text."""
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}


def model_inputs(reader: Reader, image: Image.Image,
                 request: GenerationRequest) -> tuple[BatchFeature, int]:
    """The processor's tensors for ``request``'s task on ``image``, and the token budget."""
    processor = reader.processor
    answer = request.task is Task.ANSWER
    budget = ANSWER_TOKENS if answer else MAX_NEW_TOKENS[request.detail]
    if reader.spec.prompting is Prompting.CHAT:
        instruction = request.question if answer else VLM_INSTRUCTIONS[request.detail]
        assert instruction is not None  # GenerationRequest checked an answer's question
        return chat_inputs(processor, image, instruction), budget
    text = blip_text(reader.spec.prompting, request)
    return processor(images=image, text=text, return_tensors="pt"), budget


def blip_text(prompting: Prompting, request: GenerationRequest) -> str | None:
    """BLIP's and BLIP-2's text input: the question, a long caption's prompt, or None (the
    unconditional caption both are trained for)."""
    blip2 = prompting is Prompting.BLIP2
    if request.task is Task.ANSWER:
        return BLIP2_QUESTION.format(question=request.question) if blip2 else request.question
    if request.detail is Detail.LONG:
        return BLIP2_QUESTION.format(question=BLIP2_DESCRIBE) if blip2 else BLIP_LONG_PROMPT
    return None


def chat_inputs(processor: Any, image: Image.Image, instruction: str) -> BatchFeature:
    """One user message holding the image and ``instruction``, in the folder's chat template,
    with the generation prompt (the assistant's turn) after it."""
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": instruction}]}]
    if getattr(processor, "chat_template", None) is None:
        raise ModelFormatError(
            "this vision-language model's folder has no chat template (chat_template.jinja or "
            "chat_template in processor_config.json); toile needs it to place the image and "
            "the question")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[prompt], return_tensors="pt")


def decode(reader: Reader, inputs: BatchFeature, output: torch.Tensor) -> str:
    """The generated text without special tokens: after the prompt where the model's output
    repeats it (BLIP-2 and VLMs are decoders that continue their input ids)."""
    sequence = output[0]
    echoes = reader.spec.prompting in (Prompting.BLIP2, Prompting.CHAT)
    if echoes and "input_ids" in inputs:
        sequence = sequence[inputs["input_ids"].shape[1]:]
    return reader.processor.decode(sequence, skip_special_tokens=True).strip()


def cancel_check(ctx: RunContext) -> StoppingCriteriaList:
    """A stopping criterion that never stops but raises CancelledError between tokens once
    the request is cancelled, so a long description stops within one token."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class CheckCancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            ctx.check_cancelled()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([CheckCancelled()])

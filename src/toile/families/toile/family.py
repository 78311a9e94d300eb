"""``ToileFamily``: toile's own models behind the engine's ``Family`` contract."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from toile.families.base import LoadedModel, cpu_generators
from toile.request import Mode
from toile.resolve import Cascade, FamilyDefaults
from toile.samplers import menu_for

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.resolve import ResolvedRequest

# A U-Net trained at 64×64 generalises somewhat to larger canvases (it is convolutional), but
# its self-attention at 1/4 resolution grows with the square of the pixel count; 256×256 keeps
# a CPU run within seconds and memory within a few hundred MB.
MAX_PIXELS = 256 * 256


ALL_MODES = frozenset({Mode.TXT2IMG, Mode.IMG2IMG, Mode.INPAINT, Mode.OUTPAINT})
READER_MODES = frozenset({Mode.CAPTION, Mode.ANSWER})
READER_VARIANT = "reader"  # a folder with toile_reader.json: families/toile/reader_model.py
CASCADE_FILE = "cascade.json"  # a base model's SR stages: read_cascade
SR_VARIANT = "sr"  # a folder with toile_sr.json: families/toile/sr_model.py
# The SR stage runs at the low resolution and pixel-shuffles up; 1024² out takes ~0.4 s on two
# CPU cores and a few hundred MB.
SR_MAX_PIXELS = 1024 * 1024


class ToileFamily:
    """Folders saved by ``ToilePipeline.save_pretrained`` (``_class_name`` ToilePipeline), and
    toile's reader (``toile_reader.json``: captions and answers) and super-resolution
    (``toile_sr.json``: the upscale task, and a base model's cascade) folders."""

    name = "toile"
    typical_scheduler = "FlowMatchEulerDiscreteScheduler"  # what its published checkpoints declare
    # The samplers toile's own sampling code implements (families.toile.sampling.SAMPLERS).
    own_samplers = ("Euler", "Euler a", "Heun", "DPM++ 2M", "UniPC")
    title = "toile (built-in, pixel-space rectified flow)"
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {
        "": ALL_MODES, READER_VARIANT: READER_MODES, SR_VARIANT: frozenset({Mode.UPSCALE})}
    # Loading and sampling use plain-PyTorch modules (unet.py, bert.py, reader_net.py,
    # sr_net.py): no diffusers or transformers import (LoRA and the DPM++ 2M / UniPC samplers
    # import diffusers when used).
    libraries: tuple[str, ...] = ()
    lora = True  # peft adapters on the U-Net for one run: see families/toile/lora.py
    gpu_dtype = "bfloat16"  # trained in bf16 mixed precision on GPUs
    # A1111 prompt editing / alternation: toile's own sampling loop takes per-step text
    # conditioning (each step's plain words: the sentence encoder takes no weights).
    prompt_editing = True
    # Pixel space, no VAE: the U-Net is convolutional and its packing (pixel unshuffle) is
    # local, so circular padding of the U-Net alone makes images tile (tiling.py).
    tiling = True

    def detect(self, path: Path) -> bool:
        if self.variant(path):
            return True
        index = Path(path) / "model_index.json"
        if not index.is_file():
            return False
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or UTF-8
            return False
        return isinstance(data, dict) and data.get("_class_name") == "ToilePipeline"

    def variant(self, path: Path) -> str:
        from toile.families.toile import reader_model, sr_model

        if (Path(path) / reader_model.CONFIG_FILE).is_file():
            return READER_VARIANT
        return SR_VARIANT if (Path(path) / sr_model.CONFIG_FILE).is_file() else ""

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from toile.families.toile.pipeline import ToilePipeline

        variant = self.variant(path)
        if variant == READER_VARIANT:
            return self._load_reader(Path(path), device, dtype)
        if variant == SR_VARIANT:
            return self._load_sr(Path(path), device, dtype)
        pipe = ToilePipeline.from_pretrained(path, device=device, dtype=dtype)
        config = pipe.config
        defaults = FamilyDefaults(
            modes=ALL_MODES,
            width=config.packing.image_size,
            height=config.packing.image_size,
            steps=config.sampler.steps,
            guidance=config.sampler.guidance,
            strength=0.8,
            inpaint_strength=1.0,
            size_multiple=config.size_multiple,
            max_pixels=MAX_PIXELS,
            min_side=config.size_multiple,
            partial_steps=False,  # img2img runs every step, from t = strength
        )
        cascade = read_cascade(Path(path), config.packing.image_size)
        if cascade is not None:  # larger sizes by SR stages; the default is the cascade's
            defaults = replace(defaults, cascade=cascade, width=cascade.default_side,
                               height=cascade.default_side)
        return LoadedModel(
            family=self.name,
            path=Path(path),
            defaults=defaults,
            device=device,
            dtype=dtype,
            pipelines={Mode.TXT2IMG: pipe},
            # toile samples with its own loop (families.toile.sampling): Euler, as its scheduler
            # config declares (FlowMatchEulerDiscreteScheduler), Heun, and DPM++ 2M and UniPC
            # through diffusers' flow-sigma schedulers on toile's own time schedule.
            samplers=menu_for(self, "FlowMatchEulerDiscreteScheduler"),
            supports_lora=self.lora,
        )

    def _load_sr(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from toile.families.toile.sr_model import ToileSR

        sr = ToileSR.load(path, device, dtype)
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=FamilyDefaults(modes=frozenset({Mode.UPSCALE}), width=0, height=0, steps=0,
                                    guidance=0.0, size_multiple=1, min_side=1,
                                    max_pixels=SR_MAX_PIXELS, upscale_factor=sr.factor),
            device=device,
            dtype=dtype,
            pipelines={Mode.UPSCALE: sr},
            variant=SR_VARIANT,
        )

    def _load_reader(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from toile.families.toile.reader_model import ToileReader

        reader = ToileReader.load(path, device, dtype)
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=FamilyDefaults(modes=READER_MODES, width=0, height=0, steps=0,
                                    guidance=0.0, size_multiple=1, min_side=1),
            device=device,
            dtype=dtype,
            pipelines=dict.fromkeys(READER_MODES, reader),
            variant=READER_VARIANT,
        )

    def read(self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext) -> list[str]:
        """The caption (short or long) or the answer, once: greedy decoding writes the same
        text for every seed."""
        from toile.data.reader_text import CAPTION_PROMPT, LONG_CAPTION_PROMPT
        from toile.request import Detail

        ctx.check_cancelled()
        reader = loaded.pipelines[request.mode]
        req = request.request
        assert req.image is not None  # GenerationRequest checked it
        if request.mode is Mode.ANSWER:
            assert req.question is not None
            prompt = req.question
        else:
            prompt = LONG_CAPTION_PROMPT if req.detail is Detail.LONG else CAPTION_PROMPT
        text, _ = reader.read(req.image, prompt)
        ctx.on_step(1, 1, stage="read")
        return [text] * len(request.seeds)

    def input_note(self, loaded: LoadedModel, request: ResolvedRequest) -> str:
        """What the reader does to the input image before reading it (for the record)."""
        from toile.families.toile.reader_model import preparation_note

        assert request.request.image is not None
        return preparation_note(request.request.image, loaded.pipelines[request.mode].side)

    def run(
        self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        from toile.families.tiling import tiled
        from toile.families.toile.lora import loras_applied

        if request.mode is Mode.UPSCALE:  # the SR stage: one deterministic pass per image
            ctx.check_cancelled()
            assert request.request.image is not None
            images = loaded.pipelines[Mode.UPSCALE].upscale(
                [request.request.image] * len(request.seeds),
                [request.request.prompt] * len(request.seeds))
            ctx.on_step(1, 1, stage="upscale")
            return images
        pipe = loaded.pipelines[Mode.TXT2IMG]
        req = request.request
        n = len(request.seeds)

        def on_step(step: int, total: int, x: torch.Tensor) -> None:
            ctx.on_step(step, total, preview=lambda: pipe.to_images(x[:1])[0])

        ctx.check_cancelled()
        image = req.image if request.mode in (Mode.IMG2IMG, Mode.INPAINT) else None
        mask = req.mask if request.mode is Mode.INPAINT else None
        prompt, negative, prompt_steps = step_prompts(request)
        # LoRAs for this run only, removed after; tiling inside them (peft wraps the convs)
        with loras_applied(pipe.unet, req.loras), tiled(request, pipe):
            return pipe(
                [prompt] * n,
                generators=cpu_generators(request.seeds),
                steps=request.steps,
                guidance=request.guidance,
                width=None if image is not None else request.width,
                height=None if image is not None else request.height,
                image=image,
                mask=mask,
                strength=request.strength if image is not None else None,
                negative_prompt=negative,
                callback=on_step,
                sampler=request.sampler.name if request.sampler is not None else "Euler",
                prompt_steps=prompt_steps,
            )


def read_cascade(folder: Path, native: int) -> Cascade | None:
    """A model folder's ``cascade.json``, if any: which SR model takes its images up, the
    default output side and the largest, e.g. ``{"upscaler": "toile-sr", "default_side": 256,
    "max_side": 1024}``."""
    from toile.errors import ModelFormatError
    from toile.io.weights import read_json_object

    config = folder / CASCADE_FILE
    if not config.is_file():
        return None
    section = read_json_object(config)
    try:
        return Cascade(upscaler=str(section["upscaler"]), factor=int(section.get("factor", 4)),
                       native=native, default_side=int(section["default_side"]),
                       max_pixels=int(section["max_side"]) ** 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{config} needs upscaler, default_side and max_side "
                               f"({type(exc).__name__}: {exc})") from None


def step_prompts(
    request: ResolvedRequest,
) -> tuple[str, str, list[tuple[int, str, str]] | None]:
    """(prompt, negative, per-step runs or None) for the pipeline.

    The engine hands the prompts over as written (``prompt_syntax``: this family follows A1111
    editing): their schedule over the requested steps, each run's texts as plain words (the
    sentence encoder takes no weights). A schedule that never switches is just its one prompt.
    """
    from toile.prompt_syntax import has_syntax, joint_schedule, plain_text

    def words(text: str) -> str:  # a prompt without syntax goes as typed, spaces and all
        return plain_text(text) if has_syntax(text) else text

    prompt, negative = request.request.prompt, request.request.negative_prompt
    runs = [(end, words(p), words(n))
            for end, p, n in joint_schedule(prompt, negative, request.steps)]
    if len(runs) == 1:
        return runs[0][1], runs[0][2], None
    return runs[0][1], runs[0][2], runs

"""Shared plumbing for the families that run on diffusers pipelines.

Loading is offline and safetensors-only; each family derives its img2img / inpaint pipelines
from the loaded one with ``from_pipe`` so the weights are held once. Progress and cancellation
go through diffusers' ``callback_on_step_end``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.errors import ModelFormatError, one_line
from toile.families.base import cpu_generators

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.request import LoraSpec
    from toile.resolve import ResolvedRequest
    from toile.samplers import SamplerMenu


def read_model_index(path: Path) -> dict[str, Any] | None:
    """The folder's ``model_index.json`` as a dict, or None when there is none."""
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise ModelFormatError(f"{index} is not valid JSON: {one_line(exc)}") from None
    return data if isinstance(data, dict) else None


def pipeline_class_name(path: Path) -> str | None:
    index = read_model_index(path)
    name = None if index is None else index.get("_class_name")
    return name if isinstance(name, str) else None  # a list or object names no class


def read_component_config(path: Path, component: str) -> dict[str, Any]:
    from toile.io.weights import read_json_object

    config = path / component / "config.json"
    if not config.is_file():
        config = path / component / "scheduler_config.json"
    return read_json_object(config)


def load_pipeline(
    pipeline_cls: Any, path: Path, device: str, dtype: torch.dtype, **kwargs: Any
) -> Any:
    """``from_pretrained`` from local files only, refusing pickle weights.

    A missing component or weight file becomes a ModelFormatError naming it instead of a deep
    traceback from diffusers.
    """
    try:
        pipe = pipeline_cls.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, use_safetensors=True,
            trust_remote_code=False, **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise ModelFormatError(
            f"cannot load {path} as {pipeline_cls.__name__}: {one_line(exc, 500)}"
        ) from None
    except Exception as exc:  # a broken component config or weights file: any error type
        raise ModelFormatError(
            f"cannot load {path} as {pipeline_cls.__name__}: {type(exc).__name__}: "
            f"{one_line(exc)}"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def derive(pipeline_cls: Any, base: Any, **kwargs: Any) -> Any:
    """A pipeline of another class sharing ``base``'s components (no extra memory)."""
    pipe = pipeline_cls.from_pipe(base, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# diffusers' callback_on_step_end(pipe, step, timestep, tensors) -> tensors to set in the loop
StepEnd = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def step_callback(
    ctx: RunContext,
    stage: str = "denoise",
    preview: Callable[[Any, torch.Tensor], Image.Image | None] | None = None,
    then: StepEnd | None = None,
) -> StepEnd:
    """A ``callback_on_step_end`` that reports progress and raises on cancel.

    ``preview(pipe, latents)`` turns the current latents into a small image; it is only called
    when the context wants a preview at this step. ``then``, another ``callback_on_step_end``
    (prompt editing's switch of embeddings), runs after the report — a cancelled run stops
    first — and what it returns goes back to the pipeline.
    """

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", 0) or 0)
        latents = kwargs.get("latents")
        make_preview = None
        if preview is not None and latents is not None:

            def make_preview() -> Image.Image | None:
                return preview(pipe, latents)

        ctx.on_step(step + 1, total, stage, make_preview, state=latents)
        return then(pipe, step, timestep, kwargs) if then is not None else {}

    return callback


def base_kwargs(request: ResolvedRequest, *, negative: bool = True) -> dict[str, Any]:
    """The arguments every diffusers text-to-image pipeline shares, from a resolved request.

    One seeded CPU generator per image makes image i of a batch equal a single run with seed i.
    """
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "num_images_per_prompt": len(request.seeds),
        "generator": cpu_generators(request.seeds),
        "output_type": "pil",
    }
    if negative and request.negative_prompt:
        kwargs["negative_prompt"] = request.negative_prompt
    return kwargs


def mode_kwargs(request: ResolvedRequest) -> dict[str, Any]:
    """Inputs for img2img / inpaint (outpaint arrives here as inpaint)."""
    from toile.request import Mode

    kwargs: dict[str, Any] = {}
    req = request.request
    if request.mode in (Mode.IMG2IMG, Mode.INPAINT):
        assert req.image is not None
        kwargs["image"] = req.image.convert("RGB")
        kwargs["strength"] = request.strength
    if request.mode is Mode.INPAINT:
        assert req.mask is not None
        kwargs["mask_image"] = req.mask.convert("L")
        kwargs["width"], kwargs["height"] = req.image.size
    return kwargs


@contextlib.contextmanager
def loras_applied(pipe: Any, loras: tuple[LoraSpec, ...]) -> Iterator[None]:
    """Load LoRA files as named adapters with their scales for one run, then unload them.

    Uses diffusers' own LoRA loader (peft underneath), which reads the diffusers/peft and the
    kohya key layouts. Files are already checked to be .safetensors by the engine; a malformed
    one (see ``check_lora_file``), or one diffusers cannot apply to this pipeline, is a one-line
    RequestError naming it, and whatever it had loaded before failing is unloaded.
    """
    if not loras:
        yield
        return
    from toile.errors import RequestError, one_line
    from toile.io.lora_info import check_lora_file
    from toile.logs import library_errors_silenced

    names: list[str] = []
    try:
        for index, lora in enumerate(loras):
            name = f"toile_lora_{index}"
            try:
                check_lora_file(lora.path)
            except ModelFormatError as exc:
                raise RequestError("loras", str(exc)) from None
            try:
                with library_errors_silenced():
                    pipe.load_lora_weights(lora.path, adapter_name=name)
            except Exception as exc:  # diffusers/peft on a well-formed file it cannot use
                raise RequestError(
                    "loras", f"cannot apply {lora.path}: {type(exc).__name__}: {one_line(exc)}"
                ) from None
            if name not in _loaded_adapters(pipe):
                # diffusers only warns about a file whose keys match none of its layers
                raise RequestError(
                    "loras", f"cannot apply {lora.path}: none of its weights fit this "
                    f"{type(pipe).__name__}'s layers (is it a LoRA for another model family?)"
                )
            names.append(name)
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
        yield
    finally:
        if names or _loaded_adapters(pipe):
            pipe.unload_lora_weights()


def _loaded_adapters(pipe: Any) -> set[str]:
    """Names of the LoRA adapters currently loaded into any of the pipeline's components."""
    return {name for names in pipe.get_list_adapters().values() for name in names}


def vae_preview(pipe: Any, latents: torch.Tensor) -> Image.Image | None:
    """Decode the first image's latents with the pipeline's VAE (SD-style 4D latents)."""
    import torch

    if latents.ndim != 4:
        return None
    vae = pipe.vae
    # SDXL's VAE overflows in float16 (its config says force_upcast); decode in float32 then.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    try:
        if upcast:
            vae.to(torch.float32)
        with torch.no_grad():
            scaled = latents[:1] / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift:
                scaled = scaled + shift
            image = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def sampler_menu(pipe: Any, family: Any) -> SamplerMenu:
    """The samplers the pipeline's checkpoint can use (``toile.samplers.menu_for``)."""
    from toile.samplers import menu_for

    return menu_for(family, type(pipe.scheduler).__name__)


def declared_scheduler_class(path: Path) -> str | None:
    """The diffusers scheduler class a model folder declares (read from its config, so no
    model is loaded to list samplers). None for single files or unknown layouts."""
    if not path.is_dir():
        return None
    candidates = [path / "scheduler", *sorted(path.glob("*/scheduler"))]
    for folder in candidates:
        config = folder / "scheduler_config.json"
        try:
            name = json.loads(config.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if isinstance(name, str):
            return name
    return None

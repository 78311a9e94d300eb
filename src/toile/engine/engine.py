"""The engine: one entry point for the CLI, the Python API and the server.

``Engine.run(request)`` resolves the model (id or path), loads it through its family (cached),
fills in the family's defaults, runs it with progress and cancellation, and returns the images
with one reproducible record each.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from toile.engine.loaded import CachedModel, ModelInfo
from toile.engine.models import ModelRegistry
from toile.engine.plan import Handoff, Plan, Stage, StageRole, plan_for
from toile.engine.records import build_record, prompt_syntax, stage_info
from toile.errors import ModelFormatError, RequestError, ToileError, UnsupportedModeError
from toile.families.base import InputNote, RefinerHandoff, TextReader
from toile.families.registry import detect_family
from toile.progress import ProgressCallback, RunContext
from toile.request import GenerationRequest, Mode, Task
from toile.resolve import ResolvedRequest, resolve
from toile.result import GenerationResult
from toile.safety.output_check import FlagAction, OutputCheck
from toile.safety.output_check import apply as apply_output_check
from toile.safety.policy import Policy, enforce
from toile.safety.provenance import label as provenance_label
from toile.safety.watermark import WatermarkConfig
from toile.safety.watermark import apply as apply_watermark
from toile.safety.watermark import default_config as default_watermark
from toile.samplers import scheduler_swapped

if TYPE_CHECKING:
    import torch

    from toile.families.base import Family

DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")


def pick_device(device: str | None) -> str:
    import torch

    if device is None:
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise RequestError("device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RequestError("device", "cuda was asked for but torch sees no CUDA device")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise RequestError("device", "mps was asked for but it is not available")
    return device


def pick_dtype(dtype: str | None, device: str, gpu_default: str = "float16") -> torch.dtype:
    """float32 on CPU (half precision is slow and inexact there); on GPUs the family's
    preferred half type (bfloat16 for FLUX.1, whose activations overflow float16)."""
    import torch

    if dtype is None:
        return torch.float32 if device == "cpu" else getattr(torch, gpu_default)
    if dtype not in DTYPES:
        raise RequestError("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


class Engine:
    """Registry + cache of loaded models + ``run``. Thread-safe: one run at a time per engine."""

    def __init__(
        self,
        registry: ModelRegistry | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        cache_size: int = 1,
        allow_paths: bool = True,
        policy: Policy | Literal["default"] | None = "default",
        output_check: OutputCheck | None = None,
        on_flag: FlagAction = FlagAction.WITHHOLD,
        watermark: WatermarkConfig | None = None,
    ) -> None:
        from toile.compat import check_versions

        check_versions()  # an upgraded library is one clear line here, not a traceback later
        # The prompt policy every request passes before any model work (None: off, the CLI's
        # --no-policy on a user's own machine).
        self.policy = Policy.default() if policy == "default" else policy
        # The classifier every generated image passes before it is returned, and what a
        # flagged image becomes (toile.safety.output_check).
        self.output_check = output_check
        self.on_flag = FlagAction(on_flag)
        # An invisible watermark on every image it returns, on by default (safety.watermark).
        self.watermark = watermark if watermark is not None else default_watermark()
        self.registry = registry if registry is not None else ModelRegistry()
        self.device = pick_device(device)
        self.dtype_name = dtype
        pick_dtype(dtype, self.device)  # reject a bad --dtype before any model loads
        self.cache_size = cache_size
        self.allow_paths = allow_paths
        self._cache: OrderedDict[str, CachedModel] = OrderedDict()
        self._lock = threading.RLock()

    def load(self, model: str | None = None) -> CachedModel:
        """Load (or fetch from the cache) the model named by id or path."""
        from toile.io.weights import check_folder_weights, model_hash
        from toile.logs import LIBRARIES, quiet_libraries

        entry = self.registry.resolve(model, allow_paths=self.allow_paths)
        key = str(entry.path)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            family = detect_family(entry.path)
            quiet_libraries(getattr(family, "libraries", LIBRARIES))
            if entry.path.is_dir():
                check_folder_weights(entry.path)
            gpu_dtype = getattr(family, "gpu_dtype", "float16")
            dtype = pick_dtype(self.dtype_name, self.device, gpu_dtype)
            start = time.perf_counter()
            loaded = family.load(entry.path, self.device, dtype)
            load_s = time.perf_counter() - start
            cached = CachedModel(entry, family, loaded, model_hash(entry.path), load_s)
            self._cache[key] = cached
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return cached

    def model_info(self, model: str | None = None) -> ModelInfo:
        """Load the model (or take it from the cache) and say what it declares."""
        cached = self.load(model)
        return ModelInfo(cached.entry.id, cached.family.name, cached.loaded.defaults,
                         cached.loaded.samplers)

    def resolve(self, request: GenerationRequest) -> tuple[CachedModel, ResolvedRequest]:
        if request.model is None and request.task is not Task.GENERATE:
            request = replace(request, model=self.default_model(request.task))
        cached = self.load(request.model)
        try:
            return cached, resolve(
                request, cached.loaded.defaults, cached.family.name, cached.loaded.samplers
            )
        except UnsupportedModeError as exc:
            if request.task is Task.GENERATE:
                raise
            serving = self.models_for(request.task)
            others = f"registered models that do: {', '.join(serving)}" if serving else (
                "no registered model does; add one with `toile models add ID PATH`")
            raise UnsupportedModeError(exc.field, f"{exc.message}; {others}") from None

    def models_for(self, task: Task) -> list[str]:
        """Ids of the registered models that serve ``task`` (families are detected from their
        configs; nothing is loaded)."""
        from toile.engine.models import served_tasks

        found = []
        for entry in self.registry.entries():
            try:
                tasks = served_tasks(entry.path)
            except (ToileError, OSError):  # a broken or missing entry serves nothing
                continue
            if task in tasks:
                found.append(entry.id)
        return found

    def default_model(self, task: Task) -> str:
        """The model a request of ``task`` runs on when it names none: the task's default in
        the registry (``toile models default ID --task TASK``); else the default model if it
        serves the task; else the one user-registered model that serves it; else the built-in
        one (``lanczos`` for upscale). Several registered, or none at all, is an error saying
        what to do."""
        from toile.engine.models import BUILTIN_IDS, BUILTIN_TASK_DEFAULTS

        explicit = self.registry.task_default(task)
        if explicit is not None:
            return explicit
        serving = self.models_for(task)
        default = self.registry.default_id
        if default in serving:
            return default
        registered = [model_id for model_id in serving if model_id not in BUILTIN_IDS]
        if len(registered) == 1:
            return registered[0]
        if len(registered) > 1:
            raise RequestError(
                "model", f"several models serve the {task.value} task ({', '.join(registered)}); "
                f"name one with --model, or set one with `toile models default ID --task "
                f"{task.value}`")
        builtin = BUILTIN_TASK_DEFAULTS.get(task.value)
        if builtin is None:
            raise RequestError(
                "model", f"no registered model serves the {task.value} task; add one with "
                "`toile models add ID PATH` and name it with --model")
        return builtin

    def run(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        preview_every: int = 0,
    ) -> GenerationResult:
        """Run ``request``: images (generate, edit, upscale) or texts (caption, answer), each
        with its record."""
        warnings = enforce(self.policy, request.prompt, "prompt")  # before any model work
        if request.question is not None:
            warnings += enforce(self.policy, request.question, "question")
        with self._lock:
            cached, resolved = self.resolve(request)
            ctx = RunContext(progress=progress, cancel=cancel, preview_every=preview_every)
            start = time.perf_counter()
            if resolved.task.makes_text:
                return self._run_text(cached, resolved, ctx, warnings, start)
            self._check_loras(cached, request)
            plan = plan_for(resolved, cached.loaded.defaults)
            images, stages = self._run_plan(plan, cached, resolved, ctx)
            images, checks = apply_output_check(self.output_check, self.on_flag, images)
            marked = [apply_watermark(image, self.watermark) for image in images]  # final pixels
            images = [image for image, _ in marked]
            generate_s = time.perf_counter() - start
        timings = {"load_s": round(cached.load_s, 4), "generate_s": round(generate_s, 4)}
        policy = {"policy": {"warnings": [m.to_dict() for m in warnings]}} if warnings else {}
        refiner = next((m for role, m in stages if role is StageRole.REFINER), None)
        records = [
            replace(build_record(cached, resolved, seed, timings, refiner),
                    stages=tuple(stage_info(role, m) for role, m in stages),
                    safety=policy | ({"output": check} if check else {})
                    | {"watermark": outcome.to_dict()})
            for seed, check, (_, outcome) in zip(resolved.seeds, checks, marked, strict=True)
        ]
        return GenerationResult(images=images, records=records, timings=timings,
                                finish_png=provenance_label)

    def _run_text(self, cached: CachedModel, resolved: ResolvedRequest, ctx: RunContext,
                  warnings: list, start: float) -> GenerationResult:
        """Caption or answer: the family's reader writes one text per seed."""
        family = cached.family
        if not isinstance(family, TextReader):
            raise UnsupportedModeError(
                "task", f"the {family.name} family cannot {resolved.task.value}")
        texts = family.read(cached.loaded, resolved, ctx)
        if len(texts) != len(resolved.seeds):
            raise RuntimeError(f"{family.name} wrote {len(texts)} texts for "
                               f"{len(resolved.seeds)} seeds")
        timings = {"load_s": round(cached.load_s, 4),
                   "generate_s": round(time.perf_counter() - start, 4)}
        policy = {"policy": {"warnings": [m.to_dict() for m in warnings]}} if warnings else {}
        note = family.input_note(cached.loaded, resolved) if isinstance(family, InputNote) else ""
        records = [replace(build_record(cached, resolved, seed, timings), text=text,
                           safety=policy, input_note=note)
                   for seed, text in zip(resolved.seeds, texts, strict=True)]
        return GenerationResult(images=[], records=records, timings=timings, texts=texts)

    def _run_plan(self, plan: Plan, cached: CachedModel, resolved: ResolvedRequest,
                  ctx: RunContext) -> tuple[list, list[tuple[StageRole, CachedModel]]]:
        """Run the plan's stages in order; returns the final images and (role, model) of each
        stage that ran."""
        stages = list(plan.stages)
        ran: list[tuple[StageRole, CachedModel]] = []
        images: list = []
        index = 0
        while index < len(stages):
            stage = stages[index]
            model = cached if stage.role is StageRole.BASE else self._stage_model(cached, stage)
            following = stages[index + 1] if index + 1 < len(stages) else None
            partner = None
            if following is not None and following.handoff is Handoff.LATENTS:
                partner = self._stage_model(cached, following)
            if index == 0:
                first = resolved if plan.base_size is None else replace(
                    resolved, width=plan.base_size[0], height=plan.base_size[1])
                images = self._run_mode(model, first, ctx, partner)
            else:  # each previous image is this stage's input, with the same seed
                assert stage.follow is not None
                images = [self._run_follow_up(model, stage.follow(image, seed), ctx)
                          for image, seed in zip(images, resolved.seeds, strict=True)]
            ran.append((stage.role, model))
            if partner is not None:
                ran.append((following.role, partner))
                index += 1
            index += 1
        # An upscaler's or a cascade's last pass makes at least the size asked: resize to it.
        if resolved.mode is Mode.UPSCALE or plan.base_size is not None:
            from PIL import Image

            size = (resolved.width, resolved.height)
            images = [image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
                      for image in images]
        return images, ran

    def _run_follow_up(self, model: CachedModel, request: GenerationRequest,
                       ctx: RunContext) -> Any:
        """One image through a later stage (resolved against that stage's model); an upscaler
        runs its own plan (passes of its factor, resized to the size asked for)."""
        resolved = resolve(request, model.loaded.defaults, model.family.name,
                           model.loaded.samplers)
        if resolved.mode is Mode.UPSCALE:
            images, _ = self._run_plan(plan_for(resolved, model.loaded.defaults), model,
                                       resolved, ctx)
            return images[0]
        return self._run_mode(model, resolved, ctx)[0]

    def _stage_model(self, base: CachedModel, stage: Stage) -> CachedModel:
        if stage.role is StageRole.REFINER:
            assert stage.model is not None
            return self._load_refiner(base, stage.model)
        if stage.model in (None, base.entry.id):
            return base
        # The plan comes back to the base after this model: keep both cached.
        self.cache_size = max(self.cache_size, 2)
        return self.load(stage.model)

    def _run_mode(self, cached: CachedModel, resolved: ResolvedRequest, ctx: RunContext,
                  refiner: CachedModel | None = None) -> list:
        """One stage: run the request's mode (outpaint as inpaint on the extended canvas;
        inpainting keeps the unmasked pixels), alone or handing off to ``refiner``."""
        from toile.engine.outpaint import composite, extend_canvas
        from toile.families.tiling import check_tiling

        check_tiling(cached.family, resolved)  # before any model work, for every family
        request = resolved.request
        syntax = prompt_syntax(cached.family, request)
        if syntax.plain is not None:  # an encoder without weights sees the plain words
            request = replace(request, prompt=syntax.plain[0], negative_prompt=syntax.plain[1])
            resolved = replace(resolved, request=request)
        if resolved.mode is Mode.OUTPAINT:
            assert request.image is not None and request.outpaint is not None
            canvas, mask = extend_canvas(request.image, request.outpaint)
            request = replace(request, image=canvas, mask=mask, outpaint=None)
            resolved = replace(resolved, request=request, mode=Mode.INPAINT)
        family = cached.family
        # The request's sampler on the base's pipelines (and the refiner's: A1111 samples both
        # with the one sampler chosen), for this run only.
        with contextlib.ExitStack() as stack:
            for model in (cached, refiner):
                if model is not None:
                    loaded = model.loaded
                    stack.enter_context(
                        scheduler_swapped(loaded.pipelines, loaded.samplers, resolved.sampler)
                    )
            if refiner is not None:
                assert isinstance(family, RefinerHandoff)  # _load_refiner checked
                images = family.run_with_refiner(cached.loaded, refiner.loaded, resolved, ctx)
            else:
                images = family.run(cached.loaded, resolved, ctx)
        if resolved.mode is Mode.INPAINT:
            assert request.image is not None and request.mask is not None
            images = [composite(image, request.image, request.mask) for image in images]
        self._check_count(cached, images, resolved)
        return images

    @staticmethod
    def _check_count(cached: CachedModel, images: list, resolved: ResolvedRequest) -> None:
        if len(images) != len(resolved.seeds):
            raise RuntimeError(
                f"{cached.family.name} returned {len(images)} images "
                f"for {len(resolved.seeds)} seeds"
            )

    def _load_refiner(self, base: CachedModel, refiner: str) -> CachedModel:
        """The refiner model of a base -> refiner hand-off, checked against the base first."""
        entry = self.registry.resolve(refiner, allow_paths=self.allow_paths)
        check_refiner(base.family, detect_family(entry.path), refiner)
        # Base and refiner run together: keep both cached, or every such run reloads one.
        self.cache_size = max(self.cache_size, 2)
        return self.load(refiner)

    @staticmethod
    def _check_loras(cached: CachedModel, request: GenerationRequest) -> None:
        from toile.io.lora_info import check_lora_file
        from toile.io.weights import refuse_pickle

        if request.loras and not cached.loaded.supports_lora:
            raise RequestError(
                "loras", f"the {cached.family.name} family does not support LoRA files"
            )
        for lora in request.loras:
            refuse_pickle(lora.path)
            path = Path(lora.path)
            if path.suffix.lower() != ".safetensors" or not path.is_file():
                raise RequestError(
                    "loras.path", f"{lora.path} must be an existing .safetensors file"
                )
            try:  # from the header alone: a malformed file is refused before it is applied
                check_lora_file(path)
            except ModelFormatError as exc:
                raise RequestError("loras.path", str(exc)) from None

def check_refiner(base: Family, refiner: Family, refiner_name: str) -> None:
    """A refiner hand-off needs a base family that has one and a refiner of the same family
    (cheap: families are detected from configs, nothing is loaded)."""
    if not isinstance(base, RefinerHandoff):
        raise RequestError("refiner", f"the {base.name} family has no refiner hand-off (sdxl has)")
    if refiner.name != base.name:
        raise RequestError(
            "refiner",
            f"{refiner_name} is a {refiner.name} model; the refiner must be a {base.name} "
            "model, like the base",
        )



"""The fine-tuning loop: accelerate, a progress bar with the loss, checkpoints, exact resume.

One :class:`FinetuneRunner` is one run of ``toile finetune``:

1. with prior preservation, the main process generates (or reuses) the class images;
2. every process loads the model through its family, the image set, and the trainable part:
   LoRA adapters (Hu et al. 2021) or the whole denoiser (and text encoders if asked);
3. ``accelerate`` prepares the denoiser and AdamW; each step draws a global batch from one
   aspect-ratio bucket, each process takes its slice, computes its family's loss, and DDP
   averages the gradients (several processes under ``accelerate launch``; plain on one). With
   ``fsdp`` the denoiser is sharded instead (``train/sharding.py``) and checkpoints and the
   output are written from gathered full tensors;
4. checkpoints go to ``OUT.checkpoints/step-N/`` every ``checkpoint_every`` steps and at the
   end; the result is the LoRA file ``OUT`` (or the model folder ``OUT`` with ``--method full``).

Exactness. The images of step *k* and every random draw of a sample in it are pure functions
of the seed, the step and the sample's position in the *global* batch
(:mod:`toile.train.finetune.batches`), and the learning rate is a function of the step. So a
checkpoint needs only the trainable weights, the optimizer state and the step, and:

- ``--resume`` continues bit for bit (2 steps + resume 2 = 4 straight steps);
- N processes with batch B compute the same step as one process with batch N·B, up to the
  rounding of the gradient all-reduce (``tests/test_distributed.py`` measures it), and so
  does one process with batch B and N micro-batches of gradient accumulation: a step's global
  batch is its micro-batches in order, each split over the processes in rank order.

Modules stay in eval mode while training: the released denoisers have no batch norm and zero
dropout, so that changes nothing but keeps each step a pure function of its inputs.

Text encoders trained with ``--train-text-encoder`` run through the pipeline's own
``encode_prompt``, not through a DDP wrapper; their gradients are averaged over processes by
hand (``accelerator.reduce``) before the optimizer step.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toile.errors import RequestError
from toile.train.checkpoint_io import (
    complete_checkpoints,
    load_optimizer,
    save_optimizer,
    written_atomically,
)
from toile.train.finetune.batches import FinetuneBatches
from toile.train.finetune.config import FinetuneConfig
from toile.train.finetune.dataset import index_images
from toile.train.finetune.lora import DENOISER_TARGETS, TEXT_ENCODER_TARGETS, add_lora, save_lora
from toile.train.finetune.objectives import (
    OBJECTIVES,
    Objective,
    TrainBatch,
    mse_per_sample,
    objective_for,
)
from toile.train.sharding import (
    clip_gradients,
    gathered,
    gathered_optimizer,
    gradient_sync,
    like,
    optimizer_like,
    prepare,
    shard_model,
    wants_fsdp,
)

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")


def enable_gradient_checkpointing(name: str, module: torch.nn.Module) -> None:
    """Recompute ``module``'s activations in the backward pass, through its library's switch
    (diffusers models and transformers text encoders both checkpoint non-reentrantly, so the
    gradients reach LoRA adapters under frozen weights)."""
    if getattr(module, "_supports_gradient_checkpointing", False):  # diffusers
        module.enable_gradient_checkpointing()  # type: ignore[operator]
    elif getattr(module, "supports_gradient_checkpointing", False):  # transformers
        module.gradient_checkpointing_enable(  # type: ignore[operator]
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise RequestError("gradient_checkpointing",
                           f"the {name} ({type(module).__name__}) cannot checkpoint activations")


# --------------------------------------------------------------------------- checkpoints
def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return complete_checkpoints(root, CHECKPOINT_FILES)


@dataclass
class FinetuneResult:
    """What a run produced: the output, the per-step losses of this invocation, the skips."""

    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    skipped: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    trainable_parameters: int = 0


class FinetuneRunner:
    """One fine-tuning run; ``run()`` trains to ``config.steps`` and writes the output."""

    def __init__(self, config: FinetuneConfig, *, command: str | None = None,
                 echo: Any = None) -> None:
        from accelerate import Accelerator

        from toile.engine.models import ModelRegistry
        from toile.families.registry import detect_family
        from toile.logs import quiet_libraries

        quiet_libraries()
        self.config = config
        self.command = command if command is not None else " ".join(sys.argv)
        self.echo = echo if echo is not None else _stderr
        if config.threads:
            torch.set_num_threads(config.threads)
        mixed = config.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        # Several processes on a machine without a GPU (``torchrun`` on CPU): accelerate only
        # joins them into one gloo group when told to use the CPU (``accelerate launch --cpu``
        # sets ACCELERATE_USE_CPU); without it every process would train alone.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = acc = Accelerator(
            mixed_precision=mixed, cpu=world > 1 and not torch.cuda.is_available()
        )
        self.entry = ModelRegistry().resolve(config.model)
        self.family = family = detect_family(self.entry.path)
        if family.name not in OBJECTIVES:
            raise RequestError(
                "model", f"fine-tuning supports the {', '.join(OBJECTIVES)} families; "
                f"{self.entry.path} is {family.name}"
            )
        if config.train_text_encoder and family.name == "toile":
            raise RequestError(
                "train_text_encoder",
                "toile's models condition on a frozen sentence encoder (Imagen-style); only "
                "the denoiser is fine-tuned. Leave out --train-text-encoder",
            )
        # LoRA keeps the frozen base in the mixed-precision type to save memory (the adapters
        # train in float32, as diffusers' scripts); full fine-tuning keeps float32 masters.
        # Under FSDP every weight stays float32 (one dtype per sharded unit; autocast still
        # computes in bf16).
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
        self.sharded = wants_fsdp(config.fsdp) and acc.num_processes > 1
        self.weight_dtype = half if (
            half is not None and config.method == "lora" and not self.sharded) else torch.float32

        # Captions are checked before anything slow (class images, loading the model).
        if not config.streamed:
            index_images(config.images, prompt=config.prompt)
        if config.class_data:
            index_images(config.class_data, prompt=config.class_prompt, field_name="class_data",
                         prompt_field="class_prompt")
        elif config.prior_preservation:
            self._make_class_images()
        from toile.io.weights import check_folder_weights

        if self.entry.path.is_dir():
            check_folder_weights(self.entry.path)
        loaded = family.load(self.entry.path, str(acc.device), self.weight_dtype)
        self.objective: Objective = objective_for(loaded)
        self.resolution = self._resolution(loaded.defaults)
        self.batches = FinetuneBatches(
            config, resolution=self.resolution, multiple=loaded.defaults.size_multiple,
            processes=acc.num_processes, rank=acc.process_index,
            echo=self.echo if acc.is_main_process else lambda _message: None,
        )
        self.modules, self.trainable, self.text_params = self._setup_trainable()
        text_ids = {id(p) for p in self.text_params}
        groups = [{"params": [p for p in self.trainable.values() if id(p) not in text_ids],
                   "lr": config.effective_lr}]
        if self.text_params:
            groups.append({"params": self.text_params, "lr": config.effective_text_encoder_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=config.effective_weight_decay)
        self.model, self.optimizer = prepare(acc, self.objective.denoiser, optimizer,
                                             self.sharded)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.step = 0
        if config.resume:
            self._resume()

    # ----------------------------------------------------------------------------- setup
    def _resolution(self, defaults: Any) -> int:
        resolution = self.config.resolution or min(defaults.width, defaults.height)
        if resolution % defaults.size_multiple or resolution < defaults.min_side:
            raise RequestError(
                "resolution", f"{resolution} must be a multiple of {defaults.size_multiple} "
                f"(and at least {defaults.min_side}) for {self.entry.id}"
            )
        return resolution

    def _make_class_images(self) -> None:
        """Generate the class images on the main process while the others wait."""
        from toile.engine.engine import Engine
        from toile.train.finetune.prior import ensure_class_images

        acc, config = self.accelerator, self.config
        if acc.is_main_process:
            engine = Engine(device=config.device, cache_size=1)
            defaults = engine.model_info(config.model).defaults
            resolution = self._resolution(defaults)
            self.echo(f"class images: {config.num_class_images} of {config.class_prompt!r} in "
                      f"{config.class_images_dir}")
            ensure_class_images(
                config.class_images_dir, model=config.model, class_prompt=config.class_prompt,
                count=config.num_class_images, width=resolution, height=resolution,
                seed=config.seed, steps=config.class_steps, engine=engine,
            )
            del engine  # free its copy of the model before training loads one
            gc.collect()
        acc.wait_for_everyone()

    def _setup_trainable(
        self,
    ) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Parameter], list]:
        """Freeze everything, then make the LoRA adapters (or whole modules) trainable.

        Returns ``{component: module}``, ``{"component.param": parameter}`` in a fixed order
        (the optimizer's and the checkpoint's), and the text-encoder parameters in that order.
        """
        config, objective = self.config, self.objective
        for module in objective.frozen_modules():
            module.requires_grad_(False).eval()
        modules = {objective.denoiser_name: objective.denoiser}
        if config.train_text_encoder:
            encoders = objective.text_encoders()
            if not encoders:
                raise RequestError("train_text_encoder", "this model has no trainable text encoder")
            modules.update(encoders)
            objective.train_text = True
        # Same LoRA init (A is random) in every process and every run of the same seed.
        torch.manual_seed(config.seed)
        for name, module in modules.items():
            if config.method == "lora":
                chosen = name == objective.denoiser_name and config.lora_layers is not None
                if name != objective.denoiser_name:
                    targets = TEXT_ENCODER_TARGETS
                else:
                    targets = config.lora_layers or DENOISER_TARGETS
                add_lora(module, rank=config.rank, alpha=config.effective_alpha, targets=targets,
                         require_all=chosen)
            else:
                module.requires_grad_(True)
        if config.gradient_checkpointing:
            for name, module in modules.items():
                enable_gradient_checkpointing(name, module)
        if self.sharded:  # parameters become DTensor shards: collect them after this
            shard_model(objective.denoiser, self.accelerator.device)
        if self.weight_dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            cast_training_params(list(modules.values()), dtype=torch.float32)
        trainable = {
            f"{name}.{pname}": param
            for name, module in modules.items()
            for pname, param in module.named_parameters()
            if param.requires_grad
        }
        text = [p for n, p in trainable.items() if not n.startswith(objective.denoiser_name + ".")]
        return modules, trainable, text

    # ----------------------------------------------------------------------------- train
    def run(self) -> FinetuneResult:
        """Train up to ``config.steps`` (checkpointing as configured), then save the output."""
        config, acc = self.config, self.accelerator
        root = config.checkpoint_root
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                # A fresh run replaces OUT: its old checkpoints and log would otherwise mix
                # with the new ones (and --resume could pick an old run's step).
                for old in list_checkpoints(root):
                    shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(root / "samples", ignore_errors=True)
                (root / "log.jsonl").unlink(missing_ok=True)
            config.save(root / "finetune_config.json")
        result = FinetuneResult(
            out=Path(config.out), steps=self.step, skipped=self.batches.skips.to_dict(),
            trainable_parameters=sum(p.numel() for p in self.trainable.values()),
        )
        if acc.is_main_process:
            self.echo(f"training {result.trainable_parameters:,} parameters "
                      f"({config.method}) of {self.entry.id} from step {self.step} to "
                      f"{config.steps}, {acc.num_processes} process(es) x batch "
                      f"{config.batch_size}")
        bar = None
        if acc.is_main_process and config.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=self.step, desc="finetune", unit="step",
                       dynamic_ncols=True, file=sys.stderr)
        smooth = float("nan")
        start_all = time.perf_counter()
        saved_at = self.step
        sampled_at = -1  # the step of the newest validation grid
        try:
            while self.step < config.steps:
                start = time.perf_counter()
                loss = self.train_step()
                seconds = time.perf_counter() - start
                result.losses.append(loss)
                smooth = loss if math.isnan(smooth) else 0.9 * smooth + 0.1 * loss
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", avg=f"{smooth:.4f}")
                if acc.is_main_process and (self.step % config.log_every == 0
                                            or self.step == config.steps):
                    self._log({"step": self.step, "loss": round(loss, 6),
                               "loss_smooth": round(smooth, 6), "s_per_step": round(seconds, 4)})
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
                if config.validation_every and self.step % config.validation_every == 0:
                    self.save_samples()
                    sampled_at = self.step
        except KeyboardInterrupt:
            # Keep what was trained (one process only: with several, a lone process could
            # wait forever at the checkpoint's barrier for the others).
            if acc.num_processes == 1 and self.step != saved_at:
                folder = self.save_checkpoint()
                self.echo(f"interrupted: saved {folder}; --resume continues from there")
            raise
        finally:
            if bar is not None:
                bar.close()
        if saved_at != self.step or not list_checkpoints(config.checkpoint_root):
            self.save_checkpoint()
        if config.validation_prompts and sampled_at != self.step:
            self.save_samples()
        self.save_output()
        result.skipped = self.batches.skips.to_dict()  # a stream counts its skips as it reads
        result.steps = self.step
        result.seconds = time.perf_counter() - start_all
        return result

    def train_step(self) -> float:
        """One optimizer step on the global batch of ``self.step`` (``gradient_accumulation_
        steps`` micro-batches per process); returns the mean loss."""
        config, acc = self.config, self.accelerator
        procs, micros = acc.num_processes, config.gradient_accumulation_steps
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = config.learning_rate(self.step, base)
        total = torch.zeros((), device=acc.device)
        for micro in range(micros):
            with gradient_sync(acc, self.model, self.sharded, last=micro == micros - 1):
                loss = self._micro_loss(micro)
                acc.backward(loss / micros)
            total += loss.detach().float()
        if procs > 1:
            for param in self.text_params:
                if param.grad is not None:
                    param.grad = acc.reduce(param.grad, reduction="mean")
        clip_gradients(acc, list(self.trainable.values()), config.grad_clip, self.sharded)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        value = total / micros
        if procs > 1:
            value = acc.reduce(value, reduction="mean")
        return float(value)

    def _micro_loss(self, micro: int) -> torch.Tensor:
        """The loss of this process's micro-batch ``micro`` of ``self.step``."""
        config, acc, batches = self.config, self.accelerator, self.batches
        b, prior = config.batch_size, config.prior_preservation
        bucket, pix, captions, sizes, crops = batches.instance(self.step, micro)
        gens = batches.instance_generators(self.step, micro)
        if prior:
            # Class images join the instance batch (one forward pass: DDP wants one per
            # backward) at the instance bucket's size.
            ppix, pcaptions, psizes, pcrops = batches.classes(self.step, micro, bucket)
            pix = torch.cat([pix, ppix])
            captions, sizes, crops = captions + pcaptions, sizes + psizes, crops + pcrops
            gens += batches.class_generators(self.step, micro)
        batch = TrainBatch(pix.to(acc.device), captions, gens, sizes, crops)
        with acc.autocast():
            if prior and config.prior_loss == "distill":
                losses = self._distill_losses(batch, b, micro)
            else:
                losses = self.objective.loss(self.model, batch)
        loss = losses[:b].mean()
        if prior:
            loss = loss + config.prior_weight * losses[b:].mean()
        return loss

    def _distill_losses(self, batch: TrainBatch, b: int, micro: int) -> torch.Tensor:
        """Per-sample losses [2b]: instance samples regress on their usual target, class
        samples on the base model's prediction for the same noisy input (adapters off)."""
        objective = self.objective
        pred, target = objective.predict(self.model, batch)
        # The class half again, with fresh generators of the same seeds: the same t and noise.
        prior = TrainBatch(batch.pixels[b:], batch.captions[b:],
                           self.batches.class_generators(self.step, micro),
                           batch.original_sizes[b:], batch.crops_top_left[b:])
        denoiser = objective.denoiser
        with torch.no_grad():
            denoiser.disable_adapters()
            try:
                base, _ = objective.predict(denoiser, prior)
            finally:
                denoiser.enable_adapters()
        return mse_per_sample(pred, torch.cat([target[:b], base.to(target.dtype)]))

    def save_samples(self) -> Path | None:
        """Draw ``config.validation_prompts`` with the model as trained so far (adapters on)
        through the family's own pipeline, at the training resolution, seeds ``seed + i``, into
        ``OUT.checkpoints/samples/step-N.png``; returns the path (None on other processes).

        Under FSDP every process runs the forward passes (each all-gathers its shards); with
        DDP the main process alone draws, from the unwrapped modules the pipeline holds.
        """
        from toile.io.images import labelled_rows
        from toile.progress import RunContext
        from toile.request import GenerationRequest
        from toile.resolve import resolve

        config, acc = self.config, self.accelerator
        if not (acc.is_main_process or self.sharded):
            return None
        loaded = self.objective.loaded
        rows = []
        with torch.no_grad(), acc.autocast():
            for i, prompt in enumerate(config.validation_prompts):
                request = GenerationRequest(prompt, seed=config.seed + i,
                                            width=self.resolution, height=self.resolution)
                resolved = resolve(request, loaded.defaults, self.family.name)
                rows.append((prompt, self.family.run(loaded, resolved, RunContext())))
        if not acc.is_main_process:
            return None
        path = config.checkpoint_root / "samples" / f"step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        labelled_rows(rows).save(path)  # one row per prompt, labelled with it
        return path

    def _log(self, record: dict[str, Any]) -> None:
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(self.config.checkpoint_root / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """``OUT.checkpoints/step-N/``: trainable weights, optimizer, state (temp + rename)."""
        from safetensors.torch import save_file

        acc, config = self.accelerator, self.config
        acc.wait_for_everyone()
        # Full tensors, all-gathered under FSDP by every process and kept by the writer: the
        # same files however the run is distributed.
        trainable = gathered(self.trainable, acc.is_main_process)
        optimizer = gathered_optimizer(self.optimizer.state_dict(), acc.is_main_process)
        target = config.checkpoint_root / f"step-{self.step:06d}"
        if acc.is_main_process:
            with written_atomically(target) as tmp:
                save_file(trainable, str(tmp / "trainable.safetensors"))
                save_optimizer(tmp / "optimizer.safetensors", optimizer)
                (tmp / "state.json").write_text(json.dumps({
                    "step": self.step,
                    "num_processes": acc.num_processes,
                    "data_fingerprint": self.batches.fingerprint(),
                    "class_fingerprint": self.batches.class_fingerprint(),
                    "config": config.to_dict(),
                    "command": self.command,
                }, indent=2) + "\n")
            for old in list_checkpoints(config.checkpoint_root)[: -config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def _resume(self) -> None:
        from safetensors.torch import load_file

        config, acc = self.config, self.accelerator
        found = list_checkpoints(config.checkpoint_root)
        if not found:
            if acc.is_main_process:
                self.echo(f"resume: no checkpoint in {config.checkpoint_root}; starting at 0")
            return
        folder = found[-1]
        state = json.loads((folder / "state.json").read_text())
        changed = config.resume_mismatches(state.get("config", {}))
        if state.get("num_processes") != acc.num_processes:
            changed.append(f"number of processes ({state.get('num_processes')} -> "
                           f"{acc.num_processes})")
        if state.get("data_fingerprint") != self.batches.fingerprint():
            changed.append("the images or captions")
        prior = self.batches.class_fingerprint()
        if state.get("class_fingerprint", prior) != prior:
            changed.append("the class images or their captions")
        if changed:
            raise RequestError(
                "resume", f"{folder} was made with different settings: {', '.join(changed)}; "
                "resume with the same ones, or train into a new --out"
            )
        tensors = load_file(str(folder / "trainable.safetensors"))
        missing = sorted(set(self.trainable) - set(tensors))
        if missing:
            raise RequestError("resume", f"{folder} lacks trained weights, e.g. {missing[0]}")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(like(tensors[name], param))  # this process's shard under FSDP
        self.optimizer.load_state_dict(optimizer_like(
            load_optimizer(folder / "optimizer.safetensors"), list(self.trainable.values())))
        self.step = int(state["step"])
        if acc.is_main_process:
            self.echo(f"resume: continuing from {folder} (step {self.step})")

    # ----------------------------------------------------------------------------- output
    def lora_info(self) -> dict[str, Any]:
        """The ``toile.*`` metadata written into the LoRA file."""
        import toile
        from toile.io.weights import model_hash

        config = self.config
        return {
            "base_model": self.entry.id,
            "base_model_hash": model_hash(self.entry.path),
            "family": self.objective.loaded.family,
            "method": config.method,
            "rank": config.rank,
            "alpha": config.effective_alpha,
            "lora_layers": list(config.lora_layers) if config.lora_layers else "attention",
            "steps": self.step,
            "lr": config.effective_lr,
            "batch_size": self.batches.global_batch,
            "prompt": config.prompt,
            "class_prompt": config.class_prompt if config.prior_preservation else None,
            "class_images": len(self.batches.prior) if self.batches.prior is not None else 0,
            "resolution": self.resolution,
            "train_text_encoder": config.train_text_encoder,
            "images": len(self.batches.data) if self.batches.data is not None else "streamed",
            "data_filters": (self.batches.data_filter.describe()
                             if self.batches.data_filter is not None else {}),
            "skipped": dict(self.batches.skips.counts),
            "toile_version": toile.__version__,
        }

    def save_output(self) -> Path:
        """The LoRA file (or the full model folder) at ``config.out``, from the main process."""
        acc, config = self.accelerator, self.config
        acc.wait_for_everyone()
        out = Path(config.out)
        # Under FSDP every process gathers the denoiser's full weights; the main one writes.
        full = (gathered(self.objective.denoiser.state_dict(), acc.is_main_process)
                if self.sharded else None)
        if acc.is_main_process:
            name = self.objective.denoiser_name
            if config.method == "lora":
                save_lora(out, self.modules, self.lora_info(),
                          states={name: full} if full is not None else None)
            else:
                self.objective.save_full(out, denoiser_state=full)
                (out / "finetune.json").write_text(json.dumps(self.lora_info(), indent=2) + "\n")
        acc.wait_for_everyone()
        return out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_finetune(config: FinetuneConfig, *, command: str | None = None) -> FinetuneResult:
    """Fine-tune as ``config`` says (resuming if asked); returns what the run produced."""
    return FinetuneRunner(config, command=command).run()

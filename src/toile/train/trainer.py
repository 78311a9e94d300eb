"""Training a toile model from scratch with accelerate, on the scene world or on ``--data``.

The loop is rectified-flow training (Liu et al. 2022) with SD3's logit-normal t (Esser et al.
2024): draw a batch of (image, caption) scenes, pack the images, pick t and noise, and regress
the U-Net's output on the velocity noise − x0. Around it:

- accelerate's ``Accelerator`` runs it on CPU, one GPU (bf16 autocast) or several processes
  under ``accelerate launch`` (each process draws its own batches; DDP averages gradients,
  or with ``fsdp`` the model state is sharded across them: ``train/sharding.py``);
- AdamW with linear warmup then a constant rate, gradient clipping, 10 % caption dropout;
- an EMA of the weights (diffusers ``EMAModel``), which is what gets exported;
- checkpoints as safetensors (model, EMA, optimizer, RNG, step) every few minutes, and a
  sample grid (PNG) with each; ``resume`` continues exactly from the newest checkpoint.

Exactness of resume: the batch, t, noise and caption dropout of step k depend only on
(seed, k, rank), and the learning rate only on k, so no iterator or scheduler state needs
restoring beyond model, EMA and optimizer. With ``data`` (a folder or shards, streamed) the
batch of step k is the k-th of a deterministic stream, which a resumed run replays up to k
(``train/stream_data.py``).

Run layout::

    OUT/train_config.json   OUT/run_info.json   OUT/log.jsonl   OUT/train.log (nohup)
    OUT/checkpoints/step-000500/{model,ema,optimizer,rng}.safetensors + state.json
    OUT/samples/step-000500.png
    OUT/snapshots/step-000400/{ema.safetensors,state.json}   (with ``snapshot_every``)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from toile.families.toile.denoiser import (
    TextCondition,
    build_unet,
    count_parameters,
    predict_velocity,
)
from toile.families.toile.pipeline import ToilePipeline
from toile.families.toile.sampling import (
    forward_noise,
    sample_logit_normal,
    velocity_target,
)
from toile.io.images import labelled_rows
from toile.train.checkpoint_io import (
    complete_checkpoints,
    load_optimizer,
    save_optimizer,
    written_atomically,
)
from toile.train.config import DEFAULT_SAMPLE_PROMPTS, TrainConfig
from toile.train.scene_data import make_batch
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
from toile.train.stream_data import StreamBatches

if TYPE_CHECKING:
    from toile.safety.data_filter import DataFilter

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, constant, then (with ``cooldown_steps``) linear
    decay to 0 at ``steps``. Stateless, so resume is exact."""
    scale = 1.0
    if config.warmup_steps and step < config.warmup_steps:
        scale = (step + 1) / config.warmup_steps
    left = config.steps - step  # steps still to take, this one included
    if config.cooldown_steps and left <= config.cooldown_steps:
        scale = min(scale, left / config.cooldown_steps)
    return config.lr * scale


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator for step ``step``'s t, noise and caption dropout on process ``rank``."""
    mixed = random.Random(f"toile-train:{seed}:{step}:{rank}").getrandbits(63)
    return torch.Generator("cpu").manual_seed(mixed)


def flow_matching_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    cond: TextCondition,
    generator: torch.Generator,
    *,
    t_mean: float = 0.0,
    t_std: float = 1.0,
) -> torch.Tensor:
    """Rectified-flow loss: E‖v(x_t, t, c) − (ε − x0)‖² with logit-normal t.

    x0 [B, C, h, w] are packed clean images; t, ε are drawn on the CPU from ``generator``.
    """
    batch = x0.shape[0]
    t = sample_logit_normal(batch, mean=t_mean, std=t_std, generator=generator)  # [B]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)  # [B, C, h, w]
    t, noise = t.to(x0.device), noise.to(x0.device)
    x_t = forward_noise(x0, noise, t)
    v = predict_velocity(model, x_t, t, cond)
    return torch.nn.functional.mse_loss(v.float(), velocity_target(x0, noise))


def drop_captions(
    cond: TextCondition, empty: TextCondition, p: float, generator: torch.Generator
) -> TextCondition:
    """Replace each caption's condition by the empty prompt's with probability ``p``."""
    keep = torch.rand(len(cond), generator=generator) >= p  # [B]
    return cond.where(keep.to(cond.tokens.device), empty)


# ----------------------------------------------------------------------------- checkpoints
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return complete_checkpoints(Path(run_dir) / "checkpoints", CHECKPOINT_FILES)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


@dataclass
class _Meter:
    """Smoothed loss and throughput for the progress bar and the log."""

    loss: float = float("nan")
    images: int = 0
    seconds: float = 0.0

    def update(self, loss: float, images: int, seconds: float) -> None:
        self.loss = loss if math.isnan(self.loss) else 0.98 * self.loss + 0.02 * loss
        self.images += images
        self.seconds += seconds


class Trainer:
    """One run: ``train()`` to run to ``config.steps``; ``export(out)`` for the inference folder."""

    def __init__(self, config: TrainConfig, *, command: str | None = None) -> None:
        from accelerate import Accelerator
        from diffusers.training_utils import EMAModel

        self.config = config
        self.out = Path(config.out_dir)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        mixed = config.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = Accelerator(mixed_precision=mixed)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.command = command if command is not None else " ".join(sys.argv)

        # fp32 master weights; autocast (bf16) applies in the forward under accelerate.
        self.pipe = ToilePipeline.from_config(
            config.model, device=self.device, dtype=torch.float32, seed=config.seed
        )
        unet = self.pipe.unet
        unet.train().requires_grad_(True)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # FSDP shards before the EMA and the optimizer exist, so both hold shards too.
        self.sharded = wants_fsdp(config.fsdp) and self.accelerator.num_processes > 1
        if self.sharded:
            shard_model(unet, self.device)
        self.ema = EMAModel(
            unet.parameters(), decay=config.ema_decay, use_ema_warmup=True,
            power=config.ema_power, inv_gamma=1.0,
        )
        self.ema.to(self.device)
        optimizer = torch.optim.AdamW(
            unet.parameters(), lr=learning_rate(0, config), betas=config.adam_betas,
            weight_decay=config.weight_decay,
        )
        self.model, self.optimizer = prepare(self.accelerator, unet, optimizer, self.sharded)
        self.data: StreamBatches | None = None
        self.data_filter: DataFilter | None = None  # opt-out list / checker for --data
        self._batches: Iterator[Any] | None = None
        self.step = 0
        self.train_seconds = 0.0  # accumulated over resumes, for the model card
        if config.resume:
            found = latest_checkpoint(self.out)
            if found is not None:
                self.load_checkpoint(found)

    # ------------------------------------------------------------------------------ train
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def train(self) -> Path:
        """Train up to ``config.steps`` (a no-op if already there); returns the run folder."""
        if self.config.data:
            self._open_data()
        config, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            config.save(self.out / "train_config.json")
            self._write_run_info()
        empty = self.pipe.encode_prompts([""])
        bar = None
        if acc.is_main_process and config.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=self.step, desc="train", dynamic_ncols=True,
                       mininterval=5.0)
        meter = _Meter()
        last_ckpt = time.monotonic()
        images_per_step = (config.batch_size * acc.num_processes
                           * config.gradient_accumulation_steps)
        while self.step < config.steps:
            start = time.perf_counter()
            loss = self.train_step(empty)
            seconds = time.perf_counter() - start
            self.train_seconds += seconds
            meter.update(loss, images_per_step, seconds)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{meter.loss:.4f}", img_s=f"{images_per_step / seconds:.1f}")
            if acc.is_main_process and (
                self.step % config.log_every == 0 or self.step == config.steps
            ):
                self._log(loss, meter, seconds, images_per_step)
            if self._checkpoint_due(last_ckpt) or self.step == config.steps:
                self.save_checkpoint()
                last_ckpt = time.monotonic()
            if config.snapshot_every and self.step % config.snapshot_every == 0:
                self.save_snapshot()
        if bar is not None:
            bar.close()
        if self.data is not None and self.data.skips.total and acc.is_main_process:
            print(f"data: {self.data.skips.summary()}", file=sys.stderr)
        acc.wait_for_everyone()
        return self.out

    def _open_data(self) -> None:
        """Open the ``data`` stream at this step. The sample grid's prompts, unless set to
        something other than scene-world prompts (which mean nothing for other data), are as
        many of the data's first captions (kept in ``train_config.json`` so a resumed run
        draws the same grid)."""
        config = self.config
        from toile.safety.data_filter import build_filter

        self.data_filter = build_filter(config.opt_out, config.filter_checker)
        self.data = StreamBatches(
            config.data, batch_size=config.batch_size, image_size=config.model.packing.image_size,
            multiple=config.model.size_multiple, seed=config.seed, buckets=config.data_buckets,
            data_filter=self.data_filter,
        )
        self._batches = self.data.batches(start=self.step * config.gradient_accumulation_steps)
        if not set(config.sample_prompts) <= set(DEFAULT_SAMPLE_PROMPTS):
            return
        saved = self.out / "train_config.json"
        if self.step and saved.is_file():
            prompts = tuple(json.loads(saved.read_text()).get("sample_prompts", ()))
        else:
            first = next(self._batches)
            self._batches = itertools.chain([first], self._batches)
            prompts = tuple(dict.fromkeys(first.captions))[: len(config.sample_prompts)]
        if prompts:
            self.config = config.with_changes(sample_prompts=prompts)

    def _next_batch(self, slot: int) -> tuple[torch.Tensor, list[str]]:
        """Images [B, 3, H, W] in [−1, 1] and captions for ``self.step``: the scene batch of
        ``slot`` (see :meth:`train_step`), or the stream's next batch."""
        config = self.config
        if self._batches is not None:
            batch = next(self._batches)
            return batch.pixels(), batch.captions
        scenes = make_batch(
            config.seed, self.step, config.batch_size, image_size=config.model.packing.image_size,
            rank=slot, kinds=config.scene_kinds, allow_held_out=config.allow_held_out,
        )
        return scenes.images, scenes.captions

    def train_step(self, empty: TextCondition) -> float:
        """One optimizer step on the batches of ``self.step``; returns the mean loss.

        Micro-batch j of process r is slot j·N + r (N processes): its scene batch and its
        draws are those process j·N + r would make without accumulation, so K micro-batches
        on N processes train like N·K processes (and K = 1 is the plain step).
        """
        config, acc = self.config, self.accelerator
        micros, procs = config.gradient_accumulation_steps, acc.num_processes
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, config)
        total = torch.zeros((), device=self.device)
        for micro in range(micros):
            slot = micro * procs + self.rank
            images, captions = self._next_batch(slot)
            generator = step_generator(config.seed, self.step, slot)
            x0 = self.pipe.pack(images.to(self.device))  # [B, 3p², H/p, W/p]
            cond = drop_captions(
                self.pipe.encode_prompts(captions), empty, config.caption_dropout, generator
            )
            with gradient_sync(acc, self.model, self.sharded, last=micro == micros - 1):
                with acc.autocast():
                    loss = flow_matching_loss(
                        self.model, x0, cond, generator, t_mean=config.t_mean, t_std=config.t_std
                    )
                acc.backward(loss / micros)
            total += loss.detach().float()
        clip_gradients(acc, self.model.parameters(), config.grad_clip, self.sharded)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.model.parameters())
        self.step += 1
        value = total / micros
        if procs > 1:
            value = acc.reduce(value, reduction="mean")
        return float(value)

    def _checkpoint_due(self, last: float) -> bool:
        config = self.config
        due = bool(config.checkpoint_every) and self.step % config.checkpoint_every == 0
        if config.checkpoint_minutes and time.monotonic() - last >= 60 * config.checkpoint_minutes:
            due = True
        if self.accelerator.num_processes > 1:  # clocks differ: the main process decides
            from accelerate.utils import broadcast_object_list

            due = broadcast_object_list([due])[0]
        return due

    def _log(self, loss: float, meter: _Meter, seconds: float, images: int) -> None:
        record = {
            "step": self.step,
            "loss": round(loss, 6),
            "loss_smooth": round(meter.loss, 6),
            "lr": learning_rate(self.step - 1, self.config),
            "s_per_step": round(seconds, 4),
            "images_per_s": round(images / seconds, 2),
            "mean_s_per_step": round(meter.seconds / max(1, meter.images / images), 4),
            "train_seconds": round(self.train_seconds, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if self.data is not None:
            record["skipped"] = self.data.skips.total
            record["skipped_by_reason"] = dict(self.data.skips.counts)
        with open(self.out / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _write_run_info(self) -> None:
        path = self.out / "run_info.json"
        info = json.loads(path.read_text()) if path.is_file() else {"commands": []}
        info["commands"].append({"command": self.command, "start_step": self.step,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        info["hardware"] = hardware_description(self.accelerator)
        info["parameters"] = count_parameters(self.unwrapped)
        path.write_text(json.dumps(info, indent=2) + "\n")

    # ------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N atomically (temp folder + rename); prune old ones."""
        from safetensors.torch import save_file

        acc = self.accelerator
        acc.wait_for_everyone()
        # Full tensors, all-gathered under FSDP by every process and kept by the writer: the
        # files do not depend on how the run was distributed.
        keep = acc.is_main_process
        state = gathered(self.unwrapped.state_dict(), keep)
        ema = self.ema_state(keep)
        optimizer = gathered_optimizer(self.optimizer.state_dict(), keep)
        target = self.out / "checkpoints" / f"step-{self.step:06d}"
        if acc.is_main_process:
            with written_atomically(target) as tmp:
                save_file(state, str(tmp / "model.safetensors"))
                self._write_ema_and_state(tmp, ema)
                save_optimizer(tmp / "optimizer.safetensors", optimizer)
                save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"),
                          metadata={"python": json.dumps(random.getstate())})
            for old in list_checkpoints(self.out)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            if self.config.samples_with_checkpoints and self.config.sample_prompts:
                self.sample_grid(self.out / "samples" / f"step-{self.step:06d}.png", ema)
        acc.wait_for_everyone()
        return target

    def save_snapshot(self) -> Path:
        """Write snapshots/step-N: the EMA weights and state.json (step, time, config) only.

        The same layout as a checkpoint's EMA part, so ``toile.train.export`` and
        ``toile.train.curve`` read either. Snapshots are never pruned.
        """
        target = self.out / "snapshots" / f"step-{self.step:06d}"
        ema = self.ema_state(self.accelerator.is_main_process)  # a collective under FSDP
        if self.accelerator.is_main_process:
            with written_atomically(target) as tmp:
                self._write_ema_and_state(tmp, ema)
        return target

    def ema_state(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The EMA weights by parameter name, full CPU tensors (a collective under FSDP; see
        :func:`~toile.train.sharding.gathered` for ``keep``)."""
        names = [n for n, _ in self.unwrapped.named_parameters()]
        return gathered(dict(zip(names, self.ema.shadow_params, strict=True)), keep)

    def _write_ema_and_state(self, folder: Path, ema: dict[str, torch.Tensor]) -> None:
        """ema.safetensors (EMA weights by parameter name) and state.json (step, time, config)."""
        from safetensors.torch import save_file

        save_file(ema, str(folder / "ema.safetensors"))
        state = {
            "step": self.step,
            "ema_optimization_step": self.ema.optimization_step,
            "train_seconds": self.train_seconds,
            "config": self.config.to_dict(),
        }
        (folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    def load_checkpoint(self, folder: Path) -> None:
        """Restore model, EMA, optimizer, RNG and step from ``folder``."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        # The files hold full tensors; ``like`` cuts each to this process's shard under FSDP.
        state = json.loads((folder / "state.json").read_text())
        model = self.unwrapped
        current = model.state_dict()
        model_state = load_file(str(folder / "model.safetensors"))
        model.load_state_dict({k: like(v, current[k]) for k, v in model_state.items()})
        ema_state = load_file(str(folder / "ema.safetensors"))
        names = [n for n, _ in model.named_parameters()]
        for shadow, name in zip(self.ema.shadow_params, names, strict=True):
            shadow.data.copy_(like(ema_state[name], shadow))
        self.ema.optimization_step = int(state["ema_optimization_step"])
        self.optimizer.load_state_dict(optimizer_like(
            load_optimizer(folder / "optimizer.safetensors"), list(model.parameters())))
        rng_path = folder / "rng.safetensors"
        if rng_path.is_file():
            with safe_open(str(rng_path), framework="pt") as handle:
                torch.set_rng_state(handle.get_tensor("torch_cpu"))
                py_state = json.loads(handle.metadata()["python"])
            random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))

    # ------------------------------------------------------------------------------ output
    def ema_pipeline(self, ema: dict[str, torch.Tensor]) -> ToilePipeline:
        """A pipeline whose (unsharded) U-Net holds the EMA weights ``ema`` (from
        :meth:`ema_state`); training is untouched."""
        unet = build_unet(self.config.model)
        unet.load_state_dict(ema)  # the U-Net has no buffers: parameters are its whole state
        unet.to(self.device).eval().requires_grad_(False)
        return ToilePipeline(unet, self.pipe.text_encoder, self.config.model)

    def sample_grid(self, path: Path, ema: dict[str, torch.Tensor]) -> Path:
        """Sample ``config.sample_prompts`` with the EMA weights into one PNG grid."""
        pipe = self.ema_pipeline(ema)
        prompts = list(self.config.sample_prompts)
        images = pipe(prompts, seeds=list(range(len(prompts))), steps=self.config.sample_steps,
                      guidance=self.config.sample_guidance)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One row per prompt, labelled with it, so a grid says what each image was asked for.
        labelled_rows([(p, [image]) for p, image in zip(prompts, images, strict=True)],
                      scale=2).save(path)
        return path

    def export(self, out_dir: Path, *, weights_dtype: torch.dtype | None = torch.float16,
               eval_prompts: int = 0) -> Path:
        """Write the inference folder (EMA weights) and MODEL_CARD.md. Call it from every
        process (the EMA is gathered under FSDP); the main process writes."""
        from toile.train.export import write_model_card

        ema = self.ema_state(self.accelerator.is_main_process)
        if not self.accelerator.is_main_process:
            return Path(out_dir)
        pipe = self.ema_pipeline(ema)
        pipe.save_pretrained(out_dir, weights_dtype=weights_dtype)
        write_model_card(Path(out_dir), self.out, pipe, step=self.step,
                         train_seconds=self.train_seconds, eval_prompts=eval_prompts)
        return Path(out_dir)


def hardware_description(accelerator: Any = None) -> str:
    """E.g. "cpu: x86_64, 2 torch threads" or "cuda: 1 × NVIDIA H100 (bf16)"."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        n = accelerator.num_processes if accelerator is not None else 1
        mixed = accelerator.mixed_precision if accelerator is not None else "no"
        return f"cuda: {n} × {name} (mixed precision {mixed})"
    cpu = _cpu_name() or platform.processor() or platform.machine()
    return f"cpu: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def run_training(config: TrainConfig, *, command: str | None = None) -> Path:
    """Train (or resume) the run described by ``config``; returns the run folder."""
    return Trainer(config, command=command).train()

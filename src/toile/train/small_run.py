"""One training loop for toile's small single-network models (the reader, the SR stage):
checkpoints, resume, log, progress bar and learning-rate schedule.

A run folder holds ``checkpoints/step-NNNNNN/`` (model and optimizer in safetensors, state in
JSON: no pickle, as everywhere in toile) and ``log.jsonl``. Batches must be a pure function of
the step (each trainer seeds its data from ``(seed, step)``), so a resumed run continues
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toile.train.checkpoint_io import (
    complete_checkpoints,
    load_optimizer,
    save_optimizer,
    written_atomically,
)

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
KEEP_CHECKPOINTS = 2


def warmup_cosine(step: int, steps: int, lr: float, warmup: int, cooldown: float) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then a cosine to 0 over the last
    ``cooldown`` fraction of ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    start = int(steps * (1 - cooldown))
    if step < start:
        return lr
    progress = (step - start) / max(1, steps - start)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class RunFolder:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.root / "checkpoints", CHECKPOINT_FILES)

    def latest_state(self) -> tuple[Path, dict[str, Any]] | None:
        found = self.checkpoints()
        if not found:
            return None
        return found[-1], json.loads((found[-1] / "state.json").read_text())

    def save(self, step: int, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        target = self.root / "checkpoints" / f"step-{step:06d}"
        with written_atomically(target) as tmp:
            save_file(net.state_dict(), str(tmp / "model.safetensors"))
            save_optimizer(tmp / "optimizer.safetensors", optimizer.state_dict())
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
        for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    @staticmethod
    def load(checkpoint: Path, net: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None = None) -> None:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(checkpoint / "model.safetensors"))
        if optimizer is not None:
            optimizer.load_state_dict(load_optimizer(checkpoint / "optimizer.safetensors"))


def write_model_folder(folder: Path, net: torch.nn.Module, weights_file: str, config_file: str,
                       meta: dict[str, Any]) -> None:
    """A shipped model folder: the weights in float16 (half the size; loading casts them to the
    run's dtype) and its JSON config."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    save_file(weights, str(folder / weights_file))
    (folder / config_file).write_text(json.dumps(meta, indent=2) + "\n")


def train_loop(
    run: RunFolder,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    start: int,
    steps: int,
    lr_at: Callable[[int], float],
    loss_at: Callable[[int], torch.Tensor],
    state: Callable[[int, float], dict[str, Any]],
    seconds: float = 0.0,
    checkpoint_minutes: float = 5.0,
    progress: bool = True,
    desc: str = "train",
) -> tuple[int, float]:
    """Steps ``start`` .. ``steps``: ``loss_at(step)`` builds that step's batch and loss; the
    loop sets the rate, steps the optimizer (gradients clipped to norm 1), logs every 25 steps,
    checkpoints every ``checkpoint_minutes`` and at the end. Returns (step, train seconds);
    ``state(step, seconds)`` is what each checkpoint's state.json holds besides the step."""
    from tqdm.auto import tqdm

    run.root.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
    last_save = time.monotonic()
    smoothed: float | None = None
    step = start
    with (run.root / "log.jsonl").open("a") as log:
        while step < steps:
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = loss_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            step += 1
            took = time.perf_counter() - started
            seconds += took
            value = loss.item()
            smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}")
            if step % 25 == 0:
                log.write(json.dumps({"step": step, "loss": round(smoothed, 5),
                                      "s_per_step": round(took, 3), "lr": lr_at(step - 1)})
                          + "\n")
                log.flush()
            if time.monotonic() - last_save > checkpoint_minutes * 60:
                run.save(step, net, optimizer, state(step, seconds))
                last_save = time.monotonic()
    run.save(step, net, optimizer, state(step, seconds))
    bar.close()
    return step, seconds

"""Checkpoint folders of ``toile train`` and ``toile finetune``: written atomically, listed only
when complete, optimizer state in safetensors.

Checkpoints hold no pickle, so resuming a run never executes code from a file (the same rule as
toile's model loading). ``torch.optim`` state dicts mix tensors (Adam's moments) with Python
scalars (``step`` in some versions) and the ``param_groups`` list; tensors go to the
safetensors body, the rest to its JSON metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def written_atomically(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``target`` in one
    rename, so a reader (export, resume, an interrupted run) never sees a half-written one."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def complete_checkpoints(root: Path, files: tuple[str, ...]) -> list[Path]:
    """The ``step-N`` folders under ``root`` that hold all of ``files``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*")
             if p.is_dir() and all((p / f).is_file() for f in files)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_optimizer(path: Path, state: dict[str, Any]) -> None:
    """An optimizer ``state_dict()`` (full tensors) as one safetensors file."""
    from safetensors.torch import save_file

    tensors, meta = flatten_optimizer(state)
    save_file(tensors, str(path), metadata=meta)


def load_optimizer(path: Path) -> dict[str, Any]:
    """The state dict :func:`save_optimizer` wrote (tensors on the CPU)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return unflatten_optimizer(tensors, meta)


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Optimizer ``state_dict()`` -> (tensors named ``state.INDEX.KEY``, string metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            name = f"state.{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    """The inverse of :func:`flatten_optimizer`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *json.loads(meta["scalars"]).items()]:
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}

"""Fully sharded data parallel training (``toile train/finetune --fsdp``) with torch's FSDP2.

FSDP (Zhao et al. 2023, "PyTorch FSDP") splits every parameter, gradient and optimizer moment
across the processes instead of replicating them as DDP does: each of N processes holds 1/N of
the model state, gathers a block's full weights just before using them and frees them after.
That is what lets a model too big for one device's memory train at all.

toile shards with ``torch.distributed.fsdp.fully_shard`` (FSDP2: parameters become ``DTensor``
shards along dim 0) itself rather than through accelerate, because accelerate enables FSDP only
on accelerators — on CPU processes (gloo) it silently falls back to DDP — and toile's FSDP path
must be testable on CPU like everything else. accelerate still launches the processes, sets
the device and averages the logged loss.

Each block of the denoiser (a U-Net's ``down_blocks[i]`` / ``up_blocks[i]``, a DiT's transformer
blocks) is one FSDP unit and the root holds the rest (embeddings, the middle block,
``conv_in``/``conv_out``), the usual per-block wrapping: only one block's full weights are
alive at a time in the forward and the backward.

Checkpoints stay world-size independent: model, EMA and optimizer tensors are gathered to full
tensors (:func:`gathered`) before writing, so the files are the same as a DDP or one-process
run's, and a run resumes under FSDP, DDP or one process alike (:func:`like`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


def wants_fsdp(flag: bool) -> bool:
    """``--fsdp``, or ``accelerate launch --use_fsdp`` (which sets ACCELERATE_USE_FSDP): either
    way toile shards the model itself and hands accelerate no model to wrap."""
    import os

    return flag or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """Shard ``model`` in place across every process of the default group.

    The FSDP units are the items of each ``nn.ModuleList`` directly under the model — a U-Net's
    ``down_blocks`` / ``up_blocks``, a DiT's ``transformer_blocks`` (SD3, FLUX.1) and
    ``single_transformer_blocks`` (FLUX.1) — and the root holds the rest. Call it before the
    optimizer and the EMA are made (they must see the shards), after LoRA adapters are added.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("FSDP needs several processes (launch with accelerate or torchrun)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [block for child in model.children() if isinstance(child, torch.nn.ModuleList)
             for block in child]
    if not units:
        raise RuntimeError(f"{type(model).__name__} has no block lists to shard")
    for block in units:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_tensor(tensor: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """A full CPU copy of ``tensor``; a DTensor shard is all-gathered (a collective, so every
    process calls it). ``keep=False`` (a process that writes nothing): take part in the
    all-gather, copy nothing, return None."""
    tensor = tensor.detach()
    if is_sharded(tensor):
        tensor = tensor.full_tensor()  # type: ignore[attr-defined]
    return tensor.cpu().contiguous() if keep else None


def gathered(tensors: Mapping[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU tensors of ``tensors`` (empty if not ``keep``, see :func:`full_tensor`).
    Every process must call it, with the same keys in the same order."""
    full = {name: full_tensor(value, keep) for name, value in tensors.items()}
    return {name: value for name, value in full.items() if value is not None}


def gathered_optimizer(state: Mapping[str, Any], keep: bool = True) -> dict[str, Any]:
    """An optimizer ``state_dict()`` with every sharded moment gathered (as :func:`gathered`)."""
    per_param = {
        index: {k: full_tensor(v, keep) if isinstance(v, torch.Tensor) else v
                for k, v in moments.items()}
        for index, moments in state["state"].items()
    }
    return {"state": per_param, "param_groups": state["param_groups"]}


def prepare(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            sharded: bool) -> tuple[Any, Any]:
    """accelerate's ``prepare`` (DDP wrapper, device placement) — or, for a sharded model, the
    model and optimizer as they are: FSDP reduces the gradients itself, a DDP wrapper on top
    would reduce them twice."""
    if sharded:
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def gradient_sync(accelerator: Any, model: torch.nn.Module, sharded: bool,
                  last: bool) -> AbstractContextManager[Any]:
    """The context of one micro-batch's backward under gradient accumulation: DDP all-reduces
    only in the last one (``no_sync`` before it keeps the sums local); FSDP reduce-scatters
    every backward into its sharded gradients, so it needs nothing."""
    if last or sharded:
        return nullcontext()
    return accelerator.no_sync(model)


def clip_gradients(accelerator: Any, params: Any, max_norm: float, sharded: bool) -> None:
    """Clip the global gradient norm; torch's ``clip_grad_norm_`` takes DTensor shards (the
    norm is all-reduced), accelerate's would first look for its own wrappers."""
    if not max_norm:
        return
    if sharded:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        accelerator.clip_grad_norm_(params, max_norm)


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``reference``: this process's shard if it is a DTensor, else itself
    (on the reference's device and dtype)."""
    full = full.to(device=reference.device, dtype=reference.dtype)
    if not is_sharded(reference):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, reference.device_mesh, reference.placements)  # type: ignore[attr-defined]


def optimizer_like(
    state: Mapping[str, Any], params: list[torch.nn.Parameter]
) -> dict[str, Any]:
    """A full optimizer state (as :func:`gathered_optimizer` wrote it) laid out as ``params``:
    each moment shaped like its parameter becomes that parameter's shard."""
    per_param = {}
    for index, moments in state["state"].items():
        param = params[int(index)]
        per_param[index] = {
            key: like(value, param) if isinstance(value, torch.Tensor)
            and value.shape == param.shape else value
            for key, value in moments.items()
        }
    return {"state": per_param, "param_groups": state["param_groups"]}

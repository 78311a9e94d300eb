"""Optimizer state in safetensors: checkpoints hold no pickle, so resuming a run never executes
code from a file (the same rule as toile's model loading).

``torch.optim`` state dicts mix tensors (Adam's moments) with Python scalars (``step`` in some
versions) and the ``param_groups`` list; tensors go to the safetensors body, the rest to its
JSON metadata.
"""

from __future__ import annotations

import json
from typing import Any

import torch


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

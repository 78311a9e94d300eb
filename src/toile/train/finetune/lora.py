"""LoRA adapters for fine-tuning, and the one-file format they are saved in.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a weight W
and learns a low-rank update, W' = W + (alpha / r)·B·A with A [r, in], B [out, r]; B starts at
zero, so training starts from the base model exactly. The adapters come from peft, injected with
the ``add_adapter`` of diffusers' models and transformers' text encoders, as diffusers' DreamBooth
LoRA scripts do; A is initialised Gaussian (``init_lora_weights="gaussian"``, their choice).

Targets are the attention projections: ``to_q/to_k/to_v/to_out.0`` of every diffusers attention
block (U-Net and DiT alike), plus the context-stream projections ``add_{q,k,v}_proj`` and
``to_add_out`` of the joint attention in SD3's MMDiT and FLUX.1; and ``q/k/v/out_proj`` of a CLIP
text encoder when it is trained too.

The file is what diffusers' ``save_lora_weights`` writes, so ``pipe.load_lora_weights(path)``
and toile's ``--lora`` read it back: one ``.safetensors`` whose keys are the peft state dict of
each component under the component's name (``unet.``, ``transformer.``, ``text_encoder.``,
``text_encoder_2.``), e.g. ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.
lora_A.weight``. Its metadata holds diffusers' ``lora_adapter_metadata`` (each component's
LoraConfig, so rank and alpha load exactly) and toile's own keys ``toile.*``: base model id and
SHA-256, family, method, rank, alpha, steps, learning rate, prompt, toile version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.errors import ModelFormatError, RequestError, ToileError
from toile.io.lora_info import METADATA_PREFIX, read_lora_info

if TYPE_CHECKING:
    import torch

DENOISER_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "default"  # peft's default adapter name (what add_adapter uses without a name)
__all__ = ["METADATA_PREFIX", "add_lora", "lora_state", "read_lora_info", "save_lora"]


def add_lora(
    module: torch.nn.Module, *, rank: int, alpha: float, targets: tuple[str, ...],
    require_all: bool = False,
) -> int:
    """Inject a LoRA adapter into ``module`` (a diffusers model or a transformers model);
    only the adapter's parameters train. Returns how many parameters it added.

    Targets that a module lacks are dropped first (peft refuses a target it cannot find, and a
    U-Net has no ``add_q_proj``), so one target list serves every family. A list the user chose
    (``require_all``) must match in full: a misspelt layer is an error, not a silent no-op.
    """
    import torch
    from peft import LoraConfig

    names = {name for name, _ in module.named_modules()}
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    missing = [t for t in targets if t not in present]
    if require_all and missing:
        linear = sorted({n.split(".")[-1] for n, m in module.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise RequestError(
            "lora_layers", f"{type(module).__name__} has no module named {missing}; names are "
            f"matched as suffixes of module paths (e.g. attn2.to_k); its linear layers are "
            f"called {linear}"
        )
    if not present:
        raise ModelFormatError(
            f"{type(module).__name__} has none of the LoRA target modules {list(targets)}"
        )
    module.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=present
    )
    try:
        module.add_adapter(config)
    except ValueError as exc:
        if "version of PEFT" not in str(exc):
            raise
        # transformers refuses a peft older than it supports; say which pair, in one line.
        from importlib.metadata import version

        raise ToileError(
            f"transformers {version('transformers')} and peft {version('peft')} do not work "
            f"together ({exc}); install the tested versions: pip install -r requirements.lock"
        ) from None
    added = [p for n, p in module.named_parameters() if "lora_" in n]
    for param in added:
        param.requires_grad_(True)
    return sum(p.numel() for p in added)


def adapter_config(module: torch.nn.Module) -> dict[str, Any]:
    """The module's LoraConfig as JSON-ready data (sets become sorted lists)."""
    config = module.peft_config[ADAPTER].to_dict()  # type: ignore[union-attr, index]
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def lora_state(
    modules: Mapping[str, torch.nn.Module],
    states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> tuple[dict, dict[str, Any]]:
    """(state dict, diffusers adapter metadata) for ``{component name: module}``.

    Keys are ``<component>.<peft key>``, exactly as diffusers' ``_save_lora_weights`` packs them.
    ``states`` gives a component's full state dict where the module's own would not do (FSDP
    shards, gathered beforehand).
    """
    from peft.utils import get_peft_model_state_dict

    state: dict[str, torch.Tensor] = {}
    adapters: dict[str, Any] = {}
    for prefix, module in modules.items():
        given = (states or {}).get(prefix)
        for key, value in get_peft_model_state_dict(
                module, state_dict=given, adapter_name=ADAPTER).items():
            state[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous()
        for key, value in adapter_config(module).items():
            adapters[f"{prefix}.{key}"] = value
    return state, adapters


def save_lora(
    path: str | Path, modules: Mapping[str, torch.nn.Module], info: Mapping[str, Any],
    *, dtype: torch.dtype | None = None,
    states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the LoRA file atomically (temp file + rename); ``info`` becomes ``toile.*`` metadata.

    ``dtype`` (e.g. float16) stores the weights smaller; None keeps the training dtype.
    """
    from safetensors.torch import save_file

    state, adapters = lora_state(modules, states)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    metadata = {
        "format": "pt",
        # diffusers' LORA_ADAPTER_METADATA_KEY: read back by load_lora_weights.
        "lora_adapter_metadata": json.dumps(adapters, indent=2, sort_keys=True, default=str),
    }
    for key, value in info.items():
        # Every value JSON-encoded (strings too), so reading back gives the same types.
        metadata[METADATA_PREFIX + key] = json.dumps(value)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, target)
    return target

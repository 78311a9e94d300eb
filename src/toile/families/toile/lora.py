"""LoRA files on toile's U-Net at generation time: applied for one run, removed after.

A toile LoRA (written by ``toile finetune``, see ``toile.train.finetune.lora``) has diffusers'
key layout: the peft state dict of the U-Net under ``unet.``, with the adapter's LoraConfig in
the ``lora_adapter_metadata`` header. toile's U-Net is diffusers' ``UNet2DConditionModel``, so
diffusers' own ``load_lora_adapter`` / ``set_adapters`` / ``unload_lora`` (peft underneath) do the
work, as ``loras_applied`` does for the diffusers pipelines.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from toile.errors import RequestError

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from toile.request import LoraSpec

PREFIX = "unet"


def read_unet_lora(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict with ``unet.`` keys, adapter metadata or None) from a LoRA file.

    A LoRA made for another family (its ``toile.family`` metadata says so) or without any
    ``unet.`` weights is refused by name instead of failing deep inside peft.
    """
    from safetensors import safe_open

    from toile.io.lora_info import read_lora_info

    try:
        family = read_lora_info(path).get("family")
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            keys = [k for k in handle.keys() if k.startswith(PREFIX + ".")]  # noqa: SIM118
            state = {k: handle.get_tensor(k) for k in keys}
    except Exception as exc:  # malformed header or data: the user's file, not our bug
        raise RequestError("loras", f"cannot read {path}: {exc}") from None
    if family is not None and family != "toile":
        raise RequestError("loras", f"{path} was trained for the {family} family, not toile's")
    if not state:
        raise RequestError("loras", f"{path} holds no toile U-Net weights ('{PREFIX}.*' keys)")
    raw = header.get("lora_adapter_metadata")
    return state, json.loads(raw) if raw else None


@contextlib.contextmanager
def loras_applied(unet: UNet2DConditionModel, loras: tuple[LoraSpec, ...]) -> Iterator[None]:
    """Load ``loras`` as named adapters with their scales for one run, then remove them all."""
    if not loras:
        yield
        return
    names: list[str] = []
    try:
        for index, lora in enumerate(loras):
            state, metadata = read_unet_lora(lora.path)
            name = f"toile_lora_{index}"
            try:
                unet.load_lora_adapter(state, prefix=PREFIX, adapter_name=name, metadata=metadata)
            except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                raise RequestError(
                    "loras", f"cannot apply {lora.path} to this toile model: {exc}"
                ) from None
            names.append(name)
        unet.set_adapters(names, weights=[lora.scale for lora in loras])
        yield
    finally:
        if names or getattr(unet, "peft_config", None):
            unet.unload_lora()  # removes every peft layer: the U-Net is the base model again

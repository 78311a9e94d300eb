"""LoRA files on toile's U-Net at generation time: applied for one run, removed after.

A toile LoRA (written by ``toile finetune``, see ``toile.train.finetune.lora``) has diffusers'
key layout: the peft state dict of the U-Net under ``unet.``, with the adapter's LoraConfig in
the ``lora_adapter_metadata`` header. toile's U-Net has the module names of diffusers'
``UNet2DConditionModel`` (it is that class in training, ``unet.ToileUNet`` when loaded for
generation, which takes diffusers' LoRA methods on first use), so diffusers' own
``load_lora_adapter`` / ``set_adapters`` / ``unload_lora`` (peft underneath) do the work, as
``loras_applied`` does for the diffusers pipelines. Only a run with LoRAs imports them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from toile.errors import RequestError

if TYPE_CHECKING:
    from toile.families.toile.denoiser import Denoiser
    from toile.request import LoraSpec

PREFIX = "unet"


def read_unet_lora(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict with ``unet.`` keys, adapter metadata or None) from a LoRA file.

    A malformed file (see ``check_lora_file``), a LoRA made for another family (its
    ``toile.family`` metadata says so) or one without any ``unet.`` weights is refused by name
    instead of failing deep inside peft.
    """
    from safetensors import safe_open

    from toile.errors import ModelFormatError, one_line
    from toile.io.lora_info import ADAPTER_METADATA_KEY, check_lora_file, decode_info

    try:
        header = check_lora_file(path)
    except ModelFormatError as exc:
        raise RequestError("loras", str(exc)) from None
    family = decode_info(header).get("family")
    if family is not None and family != "toile":
        raise RequestError(
            "loras", f"{path} was trained for the {one_line(family, 60)} family, not toile's"
        )
    try:
        with safe_open(path, framework="pt") as handle:
            keys = [k for k in handle.keys() if k.startswith(PREFIX + ".")]  # noqa: SIM118
            state = {k: handle.get_tensor(k) for k in keys}
    except Exception as exc:  # malformed data: the user's file, not our bug
        raise RequestError("loras", f"cannot read {path}: {one_line(exc)}") from None
    if not state:
        raise RequestError("loras", f"{path} holds no toile U-Net weights ('{PREFIX}.*' keys)")
    raw = header.get(ADAPTER_METADATA_KEY)
    return state, json.loads(raw) if raw else None  # check_lora_file parsed it once already


@contextlib.contextmanager
def loras_applied(unet: Denoiser, loras: tuple[LoraSpec, ...]) -> Iterator[None]:
    """Load ``loras`` as named adapters with their scales for one run, then remove them all."""
    if not loras:
        yield
        return
    from toile.errors import one_line
    from toile.logs import library_errors_silenced

    names: list[str] = []
    try:
        for index, lora in enumerate(loras):
            state, metadata = read_unet_lora(lora.path)
            name = f"toile_lora_{index}"
            try:
                with library_errors_silenced():
                    unet.load_lora_adapter(
                        state, prefix=PREFIX, adapter_name=name, metadata=metadata
                    )
            except Exception as exc:  # peft on a well-formed file of the wrong shapes or config
                raise RequestError(
                    "loras", f"cannot apply {lora.path} to this toile model: "
                    f"{type(exc).__name__}: {one_line(exc)}"
                ) from None
            names.append(name)
        unet.set_adapters(names, weights=[lora.scale for lora in loras])
        yield
    finally:
        if names or getattr(unet, "peft_config", None):
            unet.unload_lora()  # removes every peft layer: the U-Net is the base model again

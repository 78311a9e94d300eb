"""The training metadata in a LoRA file's safetensors header (``toile.*`` keys), and the checks
that refuse a malformed LoRA file with one clear line before any loader sees it.

``toile finetune`` writes each value JSON-encoded under ``toile.<name>`` (base model id and
hash, family, method, rank, steps, learning rate, prompt, toile version); this reads them back
without loading any tensor. Files from elsewhere simply have none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toile.errors import ModelFormatError, one_line

METADATA_PREFIX = "toile."
# diffusers' LORA_ADAPTER_METADATA_KEY: each component's peft LoraConfig, as one JSON object.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# Name parts of the LoRA weight matrices in the layouts diffusers loads (peft, kohya, the old
# attention-processor one); each is 2-D (4-D for a convolution) and one of its sides is the rank.
LORA_WEIGHT_PARTS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")


def read_header(path: str | Path) -> dict[str, str]:
    """The raw string metadata of a ``.safetensors`` file (no tensors are read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # a malformed header: say so instead of a deep traceback
        raise ModelFormatError(
            f"{path} is not a readable .safetensors file: {one_line(exc)}"
        ) from None


def decode_info(header: dict[str, str]) -> dict[str, Any]:
    """The ``toile.*`` entries of a header, JSON-decoded where they are JSON."""
    info: dict[str, Any] = {}
    for key, value in header.items():
        if key.startswith(METADATA_PREFIX):
            try:
                info[key[len(METADATA_PREFIX):]] = json.loads(value)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser's limit
                info[key[len(METADATA_PREFIX):]] = value
    return info


def read_lora_info(path: str | Path) -> dict[str, Any]:
    """The ``toile.*`` metadata of a LoRA file, JSON-decoded (``{}`` when there is none)."""
    return decode_info(read_header(path))


def check_lora_file(path: str | Path) -> dict[str, str]:
    """Refuse a LoRA file that LoRA loaders (diffusers, peft) would choke on, with a one-line
    :class:`ModelFormatError` naming the file and what is wrong; returns its header metadata.

    Checked from the header alone (no tensor is read): it parses, the LoRA weight matrices are
    matrices, and ``lora_adapter_metadata`` is a JSON object whose ranks fit the tensors (peft
    builds layers of the rank it says before loading any weight, so a huge rank would allocate
    gigabytes for a file of a few bytes).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # the library's parser: any failure is the file's
        raise ModelFormatError(
            f"{path} is not a readable .safetensors file: {one_line(exc)}"
        ) from None
    for key, shape in shapes.items():
        if any(part in key for part in LORA_WEIGHT_PARTS) and (
            len(shape) not in (2, 4) or 0 in shape
        ):
            raise ModelFormatError(
                f"{path}: LoRA weight {one_line(key, 120)!r} has shape {shape}; LoRA weights are "
                "matrices (2-D, or 4-D for convolutions) with no empty side"
            )
    raw = header.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return header
    try:
        adapters = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModelFormatError(f"{path}: its {ADAPTER_METADATA_KEY} is not valid JSON") from None
    if not isinstance(adapters, dict):
        raise ModelFormatError(
            f"{path}: its {ADAPTER_METADATA_KEY} must be a JSON object, not "
            f"{type(adapters).__name__}"
        )
    largest = max((side for shape in shapes.values() for side in shape), default=0)
    for key, value in adapters.items():
        name = key.rpartition(".")[2]
        if name == "r":
            ranks = [value]
        elif name == "rank_pattern":
            if not isinstance(value, dict):
                raise ModelFormatError(
                    f"{path}: {ADAPTER_METADATA_KEY} gives {one_line(key, 80)!r} as "
                    f"{type(value).__name__}; it must be an object of layer name -> rank"
                )
            ranks = list(value.values())
        else:
            continue
        for rank in ranks:
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= largest:
                raise ModelFormatError(
                    f"{path}: {ADAPTER_METADATA_KEY} gives rank {one_line(rank, 40)} for "
                    f"{one_line(key, 80)!r}; a rank is a whole number from 1 to the largest "
                    f"side of the file's tensors ({largest})"
                )
    return header

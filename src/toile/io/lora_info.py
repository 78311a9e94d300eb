"""The training metadata in a LoRA file's safetensors header (``toile.*`` keys).

``toile finetune`` writes each value JSON-encoded under ``toile.<name>`` (base model id and
hash, family, method, rank, steps, learning rate, prompt, toile version); this reads them back
without loading any tensor. Files from elsewhere simply have none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toile.errors import ModelFormatError

METADATA_PREFIX = "toile."


def read_header(path: str | Path) -> dict[str, str]:
    """The raw string metadata of a ``.safetensors`` file (no tensors are read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # a malformed header: say so instead of a deep traceback
        raise ModelFormatError(f"{path} is not a readable .safetensors file: {exc}") from None


def read_lora_info(path: str | Path) -> dict[str, Any]:
    """The ``toile.*`` metadata of a LoRA file, JSON-decoded (``{}`` when there is none)."""
    info: dict[str, Any] = {}
    for key, value in read_header(path).items():
        if key.startswith(METADATA_PREFIX):
            try:
                info[key[len(METADATA_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                info[key[len(METADATA_PREFIX):]] = value
    return info

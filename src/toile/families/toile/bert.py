"""A BERT encoder in plain PyTorch, with tokenization by the ``tokenizers`` library.

toile's text encoder is all-MiniLM-L6-v2, a BERT (6 layers, 384 wide, 12 heads). Loading it
through transformers costs more import time than generating an image, so this module is the same
encoder, module for module: its ``state_dict`` keys are transformers' ``BertModel``'s, and a
transformers folder (``config.json``, ``model.safetensors``, ``tokenizer.json``) loads directly.

    input_ids [B, L] -> word + position + token-type embeddings, LayerNorm     [B, L, H]
                     -> N × (self-attention over the unmasked tokens, residual, LayerNorm;
                              GELU MLP H -> I -> H, residual, LayerNorm)     [B, L, H]

What is implemented is checked by :func:`bert_config` (any other value of a field that changes
the output is refused by name); :func:`unsupported_reason` tells the caller when a folder needs
transformers instead (another model type, no ``tokenizer.json``, sharded weights).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# transformers' BertConfig defaults for the fields that shape the encoder's output.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
# Fields implemented for one value only (absent = that value).
FIXED: dict[str, Any] = {
    "model_type": "bert",
    "hidden_act": "gelu",  # the exact (erf) GELU
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
}
# Other fields (dropouts, initializer_range, use_cache, label maps, ...) change nothing in an
# inference forward pass: the encoder is frozen and runs in eval mode.


class UnsupportedConfigError(ValueError):
    """A BERT config field has a value this module does not implement."""


class BertConfig(dict):
    """The checked fields of a BERT ``config.json``, read as attributes (``config.hidden_size``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def bert_config(data: Mapping[str, Any]) -> BertConfig:
    """transformers' defaults overridden by ``data``; refuses, by field name, anything not
    implemented here (:class:`UnsupportedConfigError`)."""
    for name, value in FIXED.items():
        if data.get(name, value) != value:
            raise UnsupportedConfigError(
                f"BERT config field {name} = {data[name]!r} is not supported by toile's BERT "
                f"(it implements {value!r} only)")
    config = BertConfig({k: data.get(k, v) for k, v in DEFAULTS.items()})
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnsupportedConfigError(f"BERT config field {name} = {value!r}: must be a "
                                         "positive integer")
    if config.hidden_size % config.num_attention_heads:
        raise UnsupportedConfigError(
            f"BERT config field hidden_size = {config.hidden_size} is not a multiple of "
            f"num_attention_heads = {config.num_attention_heads}")
    return config


def _embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """``nn.Embedding``, not initialised on the meta device (``load_bert`` builds there): a
    meta ``normal_`` runs a Python reference op that imports torch._dynamo (over a second)."""
    weight = torch.empty(num, dim)
    embedding = nn.Embedding(num, dim, padding_idx=padding_idx, _weight=weight)
    if not weight.is_meta:
        embedding.reset_parameters()
    return embedding


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = _embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.position_embeddings = _embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = _embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids (token type 0 everywhere) -> [B, L, H]."""
        positions = torch.arange(ids.shape[1], device=ids.device)[None]  # [1, L]
        types = torch.zeros_like(ids)
        x = self.word_embeddings(ids) + self.token_type_embeddings(types)
        x = x + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, L, H], mask [B, 1, L, L] (True = attend) or None -> [B, L, H]."""
        b, n, width = x.shape
        head_dim = width // self.heads
        q, k, v = (proj(x).view(b, n, -1, head_dim).transpose(1, 2)  # [B, heads, L, d]
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim ** -0.5)
        return out.transpose(1, 2).contiguous().reshape(b, n, -1)


class BertDenseNorm(nn.Module):
    """dense, then LayerNorm(x + residual) (``BertSelfOutput`` and ``BertOutput``)."""

    def __init__(self, dim_in: int, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertDenseNorm(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # [B, L, I]


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertDenseNorm(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # [B, H] from the [CLS] token


class BertModel(nn.Module):
    """input_ids [B, L], attention_mask [B, L] -> last hidden states [B, L, H] (transformers'
    ``BertModel(...).last_hidden_state``; ``pooler`` only where the weights have one)."""

    def __init__(self, config: Mapping[str, Any], *, add_pooling_layer: bool = True) -> None:
        super().__init__()
        cfg = config if isinstance(config, BertConfig) else bert_config(config)
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooling_layer else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        b, n = input_ids.shape
        x = self.embeddings(input_ids)  # [B, L, H]
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # keys only: [B, L] -> [B, 1, L(queries), L(keys)], True = attend (as transformers)
            mask = attention_mask.bool()[:, None, None, :].expand(b, 1, n, n)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def unsupported_reason(folder: str | Path) -> str | None:
    """Why ``folder`` needs transformers rather than this module, or None if it does not."""
    folder = Path(folder)
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:
        return f"config.json unreadable: {exc}"
    if not isinstance(data, dict):
        return "config.json is not a JSON object"
    if data.get("model_type") != "bert":
        return f"model_type {data.get('model_type')!r}"
    if not (folder / WEIGHTS_FILE).is_file():
        return f"no {WEIGHTS_FILE}"
    if not (folder / TOKENIZER_FILE).is_file():
        return f"no {TOKENIZER_FILE}"
    return None


def load_bert(folder: str | Path, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> BertModel:
    """``folder``'s ``config.json`` + ``model.safetensors`` as a :class:`BertModel` in eval mode.

    Keys as transformers saves them; a ``bert.`` prefix (a BertFor... checkpoint) is dropped, as
    are heads on top (``cls.*``) and the old ``embeddings.position_ids`` buffer. A missing or
    misshapen encoder tensor is an error (transformers would initialise it randomly)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    data = json.loads((folder / "config.json").read_text())
    if not isinstance(data, dict):
        raise UnsupportedConfigError("config.json must hold a JSON object")
    config = bert_config(data)
    state = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    if state and all(k.startswith("bert.") or k.startswith("cls.") for k in state):
        state = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
    state.pop("embeddings.position_ids", None)
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer="pooler.dense.weight" in state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise ValueError(
            f"{folder / WEIGHTS_FILE} does not fit its config: "
            + (f"{len(missing)} tensor(s) missing, e.g. {missing[0]}" if missing
               else f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}"))
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {name} has shape "
                             f"{list(state[name].shape)}, the config needs {list(tensor.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


class BertTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library: prompts -> ids and mask [B, L],
    every prompt truncated / right-padded to ``max_tokens`` with [CLS] ... [SEP] (what
    transformers' tokenizer gives with ``padding="max_length", truncation=True``)."""

    def __init__(self, folder: str | Path, max_tokens: int) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        settings = _tokenizer_settings(folder)
        pad_token = settings.get("pad_token", "[PAD]")
        pad_id = self.tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"the padding token {pad_token!r} is not in {TOKENIZER_FILE}")
        self.tokenizer.enable_truncation(
            max_length=max_tokens, direction=settings.get("truncation_side", "right"))
        self.tokenizer.enable_padding(
            length=max_tokens, pad_id=pad_id, pad_token=pad_token,
            direction=settings.get("padding_side", "right"))

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [self.tokenizer.encode(p) for p in prompts]
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)  # [B, L]
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)  # [B, L]
        return ids, mask


def _tokenizer_settings(folder: Path) -> dict[str, str]:
    """``pad_token``, ``padding_side``, ``truncation_side`` where ``tokenizer_config.json`` (or,
    for the token, ``special_tokens_map.json``) sets them: transformers' tokenizer applies them
    over ``tokenizer.json``'s own padding and truncation."""
    settings: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(data, dict):
            continue
        for key in ("pad_token", "padding_side", "truncation_side"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                settings[key] = value
    return settings

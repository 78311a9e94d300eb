"""A1111-style prompt conditioning for CLIP-conditioned pipelines (SD 1.x/2.x, SDXL and its
refiner): emphasis weights and prompts longer than CLIP's 77 tokens.

The method is A1111's (its ``sd_hijack_clip``): the prompt's tokens go in chunks of 75, each
wrapped in begin/end tokens and padded to 77 as diffusers pads them; every chunk is encoded on its
own, its token states [1, 77, D] are multiplied by the tokens' weights and rescaled so the
chunk's mean is what it was (weights shift emphasis, not overall magnitude); chunks are joined
along the token axis [1, 77·k, D]. SDXL joins its two encoders' penultimate states along the
feature axis, as diffusers does, and takes the pooled embedding from the second encoder's
first chunk. The negative prompt gets as many chunks (empty ones appended), since the pipelines
need equal shapes.

A prompt with no syntax that fits in one chunk never comes here: the pipeline encodes it itself,
so toile's images stay diffusers' own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toile.prompt_syntax import Piece, has_syntax, parse

if TYPE_CHECKING:
    import torch

CHUNK = 75  # tokens per chunk between CLIP's begin and end tokens (77 in all)


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]


def needs_weighting(pipe: Any, prompt: str, negative: str) -> bool:
    """Whether either prompt uses emphasis/BREAK or is longer than one chunk for any of the
    pipeline's tokenizers (diffusers would cut it at 77 tokens)."""
    if has_syntax(prompt) or has_syntax(negative):
        return True
    return any(
        len(tok(text, add_special_tokens=False).input_ids) > CHUNK
        for tok, _ in _encoders(pipe)
        for text in (prompt, negative)
    )


def _chunks(tokenizer: Any, pieces: list[Piece]) -> list[tuple[list[int], list[float]]]:
    """Token ids and weights in chunks of CHUNK (BREAK closes a chunk early)."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for piece in pieces:
        if piece.is_break:
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        tokens = tokenizer(piece.text, add_special_tokens=False).input_ids
        ids += tokens
        weights += [piece.weight] * len(tokens)
        while len(ids) > CHUNK:
            chunks.append((ids[:CHUNK], weights[:CHUNK]))
            ids, weights = ids[CHUNK:], weights[CHUNK:]
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def _encode_chunk(tokenizer: Any, encoder: Any, ids: list[int], weights: list[float],
                  penultimate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk -> (weighted token states [1, 77, D], pooled output [1, D'])."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    length = CHUNK + 2
    full_ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    full_ids += [pad] * (length - len(full_ids))
    full_weights = [1.0, *weights, 1.0] + [1.0] * (length - len(weights) - 2)
    device = encoder.device
    input_ids = torch.tensor([full_ids], device=device)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = torch.tensor([[1] * (len(ids) + 2) + [0] * (length - len(ids) - 2)], device=device)
    with torch.no_grad():
        out = encoder(input_ids, attention_mask=mask, output_hidden_states=penultimate)
    states = out.hidden_states[-2] if penultimate else out[0]  # [1, 77, D]
    weight = torch.tensor(full_weights, device=device, dtype=states.dtype).view(1, -1, 1)
    mean = states.mean()
    weighted = states * weight
    weighted = weighted * (mean / weighted.mean())
    return weighted, out[0]


def _encode(pipe: Any, prompt: str, chunks_wanted: int = 0) -> tuple[torch.Tensor, Any, int]:
    """(token states [1, 77·k, D], pooled or None, k) for one prompt."""
    import torch

    pieces = parse(prompt)
    encoders = _encoders(pipe)
    sdxl = hasattr(pipe, "text_encoder_2")
    per_encoder = [_chunks(tok, pieces) for tok, _ in encoders]
    count = max(chunks_wanted, *(len(c) for c in per_encoder))
    joined, pooled = [], None
    for (tok, enc), chunks in zip(encoders, per_encoder, strict=True):
        chunks = chunks + [([], [])] * (count - len(chunks))
        states = []
        for index, (ids, weights) in enumerate(chunks):
            chunk_states, chunk_pooled = _encode_chunk(tok, enc, ids, weights, penultimate=sdxl)
            states.append(chunk_states)
            if index == 0 and enc is encoders[-1][1]:
                pooled = chunk_pooled
        joined.append(torch.cat(states, dim=1))
    return torch.cat(joined, dim=-1), (pooled if sdxl else None), count


def with_weighted_prompts(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for ``pipe`` with ``prompt`` / ``negative_prompt`` turned into embeddings when
    they use A1111 syntax or run past one chunk; unchanged otherwise."""
    prompt, negative = kwargs.get("prompt", ""), kwargs.get("negative_prompt", "")
    if not needs_weighting(pipe, prompt, negative):
        return kwargs
    rest = {k: v for k, v in kwargs.items() if k not in ("prompt", "negative_prompt")}
    return rest | weighted_prompt_kwargs(pipe, prompt, negative)


def weighted_prompt_kwargs(pipe: Any, prompt: str, negative: str) -> dict[str, Any]:
    """The pipeline's ``prompt_embeds`` (and negative, and SDXL's pooled) arguments in place of
    ``prompt`` / ``negative_prompt``."""
    import torch

    embeds, pooled, count = _encode(pipe, prompt)
    kwargs: dict[str, Any] = {"prompt_embeds": embeds}
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = pooled
    negative_embeds, negative_pooled, negative_count = _encode(pipe, negative, count)
    if negative_count > count:  # a longer negative: the prompt gets empty chunks too
        embeds, pooled, _ = _encode(pipe, prompt, negative_count)
        kwargs["prompt_embeds"] = embeds
        if pooled is not None:
            kwargs["pooled_prompt_embeds"] = pooled
    if not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        # SDXL's convention for "no negative prompt", as its encode_prompt applies it.
        negative_embeds = torch.zeros_like(negative_embeds)
        negative_pooled = torch.zeros_like(negative_pooled) if negative_pooled is not None else None
    kwargs["negative_prompt_embeds"] = negative_embeds
    if negative_pooled is not None:
        kwargs["negative_pooled_prompt_embeds"] = negative_pooled
    return kwargs

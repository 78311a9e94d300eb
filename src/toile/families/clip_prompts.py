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

Prompt editing and alternation (:mod:`toile.prompt_syntax`) switch the conditioning during
sampling: every distinct (prompt, negative) text of the schedule is encoded before the run, as
the pipeline would encode it (weighted as above when it needs it, else by the pipeline's own
``encode_prompt``), and :class:`PromptSwitch`, a ``callback_on_step_end``, hands the next step's
embeddings to the denoising loop. In that loop they are ``cat([negative, positive])`` repeated per
image (positive alone without classifier-free guidance), and SDXL's pooled embeddings are
``add_text_embeds``, laid out the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toile.errors import RequestError
from toile.prompt_syntax import Piece, has_editing, has_syntax, joint_schedule, parse

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
    if all(w == 1.0 for w in full_weights):
        # Nothing to weight: the states as they are (the rescale below would be 0/0 for states
        # whose mean is exactly 0, as a layer norm without bias can make them).
        return states, out[0]
    weight = torch.tensor(full_weights, device=device, dtype=states.dtype).view(1, -1, 1)
    mean = states.mean()
    weighted = states * weight
    new_mean = weighted.mean()
    if new_mean != 0:
        weighted = weighted * (mean / new_mean)
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


# A pipeline's embeddings for one (prompt, negative) pair, batch 1: the keyword arguments it
# takes them by (prompt_embeds, negative_prompt_embeds and SDXL's two pooled ones).
Embeddings = dict[str, "torch.Tensor"]


def scheduled_prompt_kwargs(
    pipe: Any, kwargs: dict[str, Any], steps: int, *, offset: int = 0
) -> tuple[dict[str, Any], PromptSwitch | None]:
    """``kwargs`` for ``pipe`` with its prompts encoded, and the step callback that switches the
    conditioning as their A1111 editing schedule over ``steps`` says (None when nothing
    switches). ``offset``: steps of the schedule an earlier pipeline already ran (a refiner
    continues the base's count). Prompts without editing go through ``with_weighted_prompts``.
    """
    prompt, negative = kwargs.get("prompt", ""), kwargs.get("negative_prompt", "")
    if not (has_editing(prompt) or has_editing(negative)):
        return with_weighted_prompts(pipe, kwargs), None
    schedule = joint_schedule(prompt, negative, steps)
    runs = [run for run in schedule if run[0] > offset] or schedule[-1:]
    rest = {k: v for k, v in kwargs.items() if k not in ("prompt", "negative_prompt")}
    if len(runs) == 1:  # one text for every step left: exactly a run with that prompt
        _, first, first_negative = runs[0]
        return with_weighted_prompts(pipe, rest | _text_kwargs(first, first_negative)), None
    encoded: dict[tuple[str, str], Embeddings] = {}
    for _, text, negative_text in runs:
        if (text, negative_text) not in encoded:
            encoded[text, negative_text] = prompt_embeddings(pipe, text, negative_text)
    segments = [(end, encoded[text, negative_text]) for end, text, negative_text in runs]
    inputs = ["latents", "prompt_embeds"]
    if "pooled_prompt_embeds" in segments[0][1]:
        inputs.append("add_text_embeds")
    _check_switchable(pipe, inputs)
    order = int(getattr(pipe.scheduler, "order", 1) or 1)
    switch = PromptSwitch(segments, offset=offset, order=order)
    return rest | segments[0][1] | {"callback_on_step_end_tensor_inputs": inputs}, switch


def steps_run(pipe: Any) -> int:
    """Sampler steps the pipeline's last call ran (its loop runs ``scheduler.order`` model
    evaluations per step), for a refiner to continue the schedule's count."""
    order = int(getattr(pipe.scheduler, "order", 1) or 1)
    return -(-int(pipe.num_timesteps) // order)


def prompt_embeddings(pipe: Any, prompt: str, negative: str) -> Embeddings:
    """The embeddings ``pipe`` would compute for these texts, batch 1: A1111-weighted when they
    need it, else the pipeline's own ``encode_prompt`` (an empty negative as the pipeline takes
    no negative prompt: SDXL's zeros)."""
    if needs_weighting(pipe, prompt, negative):
        return weighted_prompt_kwargs(pipe, prompt, negative)
    encoded = pipe.encode_prompt(
        prompt=prompt, device=pipe._execution_device, num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=negative or None,
    )
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if len(encoded) == 4:  # SDXL: (embeds, negative, pooled, negative pooled)
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, encoded, strict=True))


def _text_kwargs(prompt: str, negative: str) -> dict[str, str]:
    # An empty negative is left out, as base_kwargs does (SDXL zeroes an absent one only).
    return {"prompt": prompt} | ({"negative_prompt": negative} if negative else {})


def _check_switchable(pipe: Any, inputs: list[str]) -> None:
    allowed = set(getattr(pipe, "_callback_tensor_inputs", ()))
    missing = [name for name in inputs if name not in allowed]
    if missing:
        raise RequestError(
            "prompt",
            f"prompt editing and alternation need per-step embeddings, and "
            f"{type(pipe).__name__}'s step callback cannot set {', '.join(missing)}; remove "
            "them (escape literal brackets as \\[ \\])",
        )


@dataclass
class PromptSwitch:
    """The part of a ``callback_on_step_end`` that gives the denoising loop the next step's
    embeddings: ``segments`` are (last step of the schedule, embeddings) in order.

    The callback runs after loop iteration ``i`` (0-based); the next iteration is sampler step
    ``offset + (i + 1) // order + 1`` of the schedule, counted over the steps that run (img2img
    starts the count at its first step, as A1111 does)."""

    segments: list[tuple[int, Embeddings]]
    offset: int = 0
    order: int = 1
    current: int = 0
    _batched: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __call__(self, pipe: Any, i: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        step = self.offset + (i + 1) // self.order + 1
        index = next((k for k, (end, _) in enumerate(self.segments) if step <= end),
                     len(self.segments) - 1)
        if index == self.current:
            return {}
        self.current = index
        if index not in self._batched:
            self._batched[index] = _loop_layout(pipe, self.segments[index][1], tensors)
        return dict(self._batched[index])


def _loop_layout(pipe: Any, embeddings: Embeddings, tensors: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 embeddings laid out as the loop holds them: repeated per image, and
    ``cat([negative, positive])`` under classifier-free guidance; dtype and device as the loop's.
    """
    import torch

    guided = bool(pipe.do_classifier_free_guidance)
    current = tensors["prompt_embeds"]
    images = current.shape[0] // (2 if guided else 1)

    def layout(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        repeat = (images,) + (1,) * (positive.ndim - 1)
        joined = positive.repeat(repeat)
        if guided:
            joined = torch.cat([negative.repeat(repeat), joined])
        return joined.to(device=current.device, dtype=current.dtype)

    out = {"prompt_embeds": layout(embeddings["prompt_embeds"],
                                   embeddings["negative_prompt_embeds"])}
    if "add_text_embeds" in tensors:
        pooled = layout(embeddings["pooled_prompt_embeds"],
                        embeddings["negative_pooled_prompt_embeds"])
        out["add_text_embeds"] = pooled.to(tensors["add_text_embeds"].dtype)
    return out

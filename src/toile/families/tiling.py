"""Seamless tiling (AUTOMATIC1111's "Tiling"): images whose left edge continues their right
edge and whose top edge continues their bottom one, so they repeat without a seam.

A1111 makes them by switching every ``Conv2d`` of the denoiser and the VAE to circular padding
for the run: where a convolution would read zeros past an edge it reads the opposite edge, so
the network treats the canvas as a torus. A U-Net and a VAE built of convolutions, group norms
and self-attention without positions are then equivariant under circular shifts of the canvas
(by multiples of their downsampling factor): nothing in them knows where the edge is, and the
image wraps around. diffusers has no option for this, so toile flips the same attribute on
the modules for one run and puts it back afterwards.

Which families tile is a class attribute, ``tiling``: True for the convolutional ones (SD,
SDXL, toile's own U-Net). FLUX.1 and SD3 denoise with transformers that place their patches by
position (their only convolutions are the patch embeddings, which have no padding), so padding
their VAEs circularly would wrap the decoding but not the picture; DeepFloyd IF resizes its
images between stages with filters that do not wrap. Those refuse the request with
:func:`check_tiling` (the engine calls it for every family) rather than return an image
that does not tile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from toile.errors import RequestError

if TYPE_CHECKING:
    import torch

    from toile.resolve import ResolvedRequest

TILING_FAMILIES = "sd, sdxl and toile"  # the families whose class says ``tiling = True``


@contextlib.contextmanager
def circular_padding(*modules: torch.nn.Module) -> Iterator[None]:
    """For the ``with`` block, every ``Conv2d`` with padding inside ``modules`` pads circularly;
    each one's previous mode is restored afterwards, also when the block raises.

    ``modules()`` walks the whole tree, so the base layer inside a peft LoRA wrapper (and the
    LoRA's own padded down-projection) is found too. Setting ``padding_mode`` at run time is
    enough: ``Conv2d._conv_forward`` reads it on every call and pads by
    ``_reversed_padding_repeated_twice``, which ``__init__`` computed whatever the mode.
    Convolutions without padding of their own are left alone, as in A1111 (the VAE
    encoder's stride-2 downsamplers pad by hand with zeros: img2img inputs are encoded
    with a faint edge, the generated image still wraps).
    """
    import torch

    saved: dict[torch.nn.Conv2d, str] = {}  # a module shared by two pipelines counts once
    for module in modules:
        for layer in module.modules():
            if (isinstance(layer, torch.nn.Conv2d) and layer not in saved
                    and any(layer._reversed_padding_repeated_twice)):
                saved[layer] = layer.padding_mode
    try:
        for layer in saved:
            layer.padding_mode = "circular"
        yield
    finally:
        for layer, mode in saved.items():
            layer.padding_mode = mode


def tiled(request: ResolvedRequest, *pipes: Any) -> contextlib.AbstractContextManager[None]:
    """:func:`circular_padding` on each pipeline's ``unet`` and ``vae`` (whichever it has) when
    the request asks for tiling, else a context that changes nothing."""
    if not request.request.tiling:
        return contextlib.nullcontext()
    parts = (getattr(pipe, name, None) for pipe in pipes for name in ("unet", "vae"))
    return circular_padding(*(part for part in parts if part is not None))


def check_tiling(family: Any, request: ResolvedRequest) -> None:
    """Refuse a tiling request for a family whose ``tiling`` attribute is not True (see the
    module docstring for why each one is or is not)."""
    if request.request.tiling and getattr(family, "tiling", False) is not True:
        raise RequestError(
            "tiling", f"the {family.name} family cannot make seamless tiles: toile tiles by "
            "padding a convolutional denoiser and VAE circularly, as AUTOMATIC1111 does, which "
            f"makes images tile with the {TILING_FAMILIES} families only; leave tiling off")

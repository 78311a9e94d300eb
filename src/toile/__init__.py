"""toile: text-to-image generation, training and serving.

Importing ``toile`` defines names only; torch, diffusers and friends load lazily on first use,
so ``toile --help`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from toile.api import Generator


def load(
    model: str | None = None, *, device: str | None = None, dtype: str | None = None
) -> Generator:
    """Load a model (id from the registry, a path, or None for the built-in default).

    Returns a :class:`toile.api.Generator` whose ``generate(prompt, **fields)`` runs one request.
    """
    from toile.api import Generator

    return Generator(model, device=device, dtype=dtype)


def __getattr__(name: str) -> Any:
    # Lazy re-exports of the core types, so `from toile import GenerationRequest` works without
    # importing torch at package import time.
    if name in {"GenerationRequest", "LoraSpec", "Mode", "Outpaint"}:
        from toile import request

        return getattr(request, name)
    if name in {"GenerationResult", "ImageRecord"}:
        from toile import result

        return getattr(result, name)
    if name in {"ToileError", "RequestError"}:
        from toile import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'toile' has no attribute {name!r}")


__all__ = ["__version__", "load"]

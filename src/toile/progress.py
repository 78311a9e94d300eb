"""Progress events and cancellation, shared by the engine, the families and the interfaces."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from toile.errors import CancelledError, NumericalError

if TYPE_CHECKING:
    import torch
    from PIL import Image


@dataclass(frozen=True)
class ProgressEvent:
    """One denoising step done. ``stage`` names the pass (e.g. "stage 2/3" in a cascade)."""

    step: int
    total: int
    stage: str = "denoise"
    preview: Image.Image | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class RunContext:
    """What a family's run needs besides the request: progress reporting and cancellation.

    ``on_step`` is called once per denoising step; it raises CancelledError as soon as the
    cancel event is set, so a running job stops within one step. ``preview`` is only called
    every ``preview_every`` steps, because decoding a preview costs a VAE pass.
    """

    progress: ProgressCallback | None = None
    cancel: threading.Event | None = None
    preview_every: int = 0

    def check_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("generation cancelled")

    def on_step(
        self,
        step: int,
        total: int,
        stage: str = "denoise",
        preview: Callable[[], Image.Image | None] | None = None,
        state: torch.Tensor | None = None,
    ) -> None:
        """Report step ``step`` of ``total``. ``state`` (the latents / pixels being denoised)
        is checked to be finite, so a NaN run fails at once with a reason."""
        self.check_cancelled()
        if state is not None:
            import torch

            if not bool(torch.isfinite(state).all()):
                raise NumericalError(
                    f"{stage}: the denoising state became NaN/inf at step {step} of {total} "
                    "(try --dtype float32 or bfloat16)"
                )
        if self.progress is None:
            return
        image = None
        if (
            preview is not None
            and self.preview_every > 0
            and (step % self.preview_every == 0 or step == total)
        ):
            image = preview()
        self.progress(ProgressEvent(step=step, total=total, stage=stage, preview=image))

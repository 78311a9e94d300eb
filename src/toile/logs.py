"""Quiet the libraries' own loading bars and advisory warnings: toile reports progress itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache


@cache
def quiet_libraries() -> None:
    """Called once before the first model load (not at import: importing toile does no work)."""
    from transformers.utils import logging as transformers_logging

    # transformers first: importing diffusers' pipelines triggers transformers' warnings.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


@contextlib.contextmanager
def library_errors_silenced() -> Iterator[None]:
    """Around a load whose failure toile reports itself, in one line: diffusers and peft log
    the same failure first, at ERROR level and over many lines (e.g. "Loading toile_lora_0 was
    unsuccessful with the following error: ..." and every size mismatch)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)

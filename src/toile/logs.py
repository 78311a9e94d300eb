"""Quiet the libraries' own loading bars and advisory warnings: toile reports progress itself."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

LIBRARIES = ("transformers", "diffusers")  # transformers first: diffusers' pipelines warn via it
_quieted: set[str] = set()


def quiet_libraries(needed: tuple[str, ...] = LIBRARIES) -> None:
    """Quiet the libraries a model load is about to use (``needed``) and any already imported;
    never import one only to quiet it (toile's own models need neither: importing diffusers
    would cost a one-shot ``toile generate`` about 2 s). Called before model loads, not at
    import. Libraries imported later still start at ERROR level (their environment switches)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in LIBRARIES:
        if name in _quieted or (name not in needed and name not in sys.modules):
            continue
        logging = importlib.import_module(f"{name}.utils.logging")
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        _quieted.add(name)


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

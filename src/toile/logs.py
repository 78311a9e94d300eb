"""Quiet the libraries' own loading bars and advisory warnings: toile reports progress itself."""

from __future__ import annotations

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

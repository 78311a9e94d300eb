"""Where toile keeps its files: ``$TOILE_HOME`` or ``~/.config/toile`` (models.json, caches)."""

from __future__ import annotations

import os
from pathlib import Path


def toile_home() -> Path:
    env = os.environ.get("TOILE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "toile"


def builtin_models_dir() -> Path:
    """The models shipped inside the package (``toile-mini``)."""
    return Path(__file__).resolve().parent / "assets"

"""The LoRA ids a server's clients may name, and the files they stand for.

Two sources, both written only by the operator on the server's machine (a client can never
send a path):

- the ``[loras]`` table of the server's config file: fixed for the server's life;
- the LoRA registry of ``toile loras add ID PATH`` (``$TOILE_HOME/loras.json``): re-read
  whenever the file changes (one ``stat`` per lookup), so a LoRA that ``toile finetune`` just
  made is served without a restart. A config id wins over a registry id of the same name.

A vanished file or an unknown id is a ``RequestError`` on ``loras[i].id`` when the job is
submitted; the worker looks the id up again when it runs the job, so a re-pointed id serves
its new file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from toile.engine.models import LoraRegistry
from toile.errors import ModelFormatError, RequestError

log = logging.getLogger("toile.serve")


class ServerLoras:
    """``id -> .safetensors`` for the server: its config's table, then the live registry."""

    def __init__(self, fixed: Mapping[str, Path], registry: LoraRegistry | None = None) -> None:
        self.fixed = dict(fixed)
        self.registry = registry if registry is not None else LoraRegistry()

    def _registered(self) -> dict[str, Path]:
        """The registry's entries, re-read if its file changed. A registry file broken by hand
        must not take the server down: it is logged and only the config's LoRAs are served."""
        try:
            self.registry.reload_if_changed()
            return {entry.id: entry.path for entry in self.registry.entries()}
        except ModelFormatError as exc:
            log.warning("LoRA registry ignored: %s", exc)
            return {}

    def table(self) -> dict[str, Path]:
        return self._registered() | self.fixed

    def ids(self) -> list[str]:
        return sorted(self.table())

    def path(self, lora_id: str, field: str = "loras") -> Path:
        """The file of ``lora_id``; an unknown id or a vanished file names ``field``."""
        table = self.table()
        path = table.get(lora_id)
        if path is None:
            known = ", ".join(sorted(table)) or "none are configured"
            raise RequestError(field, f"unknown LoRA id {lora_id!r} ({known})")
        if not path.is_file():
            raise RequestError(field, f"LoRA {lora_id!r}: its file is gone from the server")
        return path

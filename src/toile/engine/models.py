"""The model registry: ids -> paths, kept in ``<toile home>/models.json``.

The built-in ``toile-mini`` is always present and is the default unless the file names another.
``--model`` accepts an id or a path; the server accepts ids only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from toile.config import builtin_models_dir, toile_home
from toile.errors import ModelFormatError, ModelNotFoundError, RequestError

BUILTIN_MODEL = "toile-mini"
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelEntry:
    id: str
    path: Path
    builtin: bool = False


class ModelRegistry:
    """Reads and writes the registry file; never touches the network."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else toile_home() / "models.json"

    def _read(self) -> dict:
        if not self.path.is_file():
            return {"models": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"model registry {self.path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
            raise ModelFormatError(
                f"model registry {self.path} must hold {{'models': {{id: ...}}}}"
            )
        data.setdefault("models", {})
        return data

    def _write(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)

    def entries(self) -> list[ModelEntry]:
        found = [ModelEntry(BUILTIN_MODEL, builtin_models_dir() / BUILTIN_MODEL, builtin=True)]
        for model_id, spec in sorted(self._read()["models"].items()):
            path = spec.get("path") if isinstance(spec, dict) else spec
            found.append(ModelEntry(model_id, Path(str(path)).expanduser()))
        return found

    @property
    def default_id(self) -> str:
        return str(self._read().get("default", BUILTIN_MODEL))

    def get(self, model_id: str) -> ModelEntry:
        for entry in self.entries():
            if entry.id == model_id:
                return entry
        known = ", ".join(e.id for e in self.entries())
        raise ModelNotFoundError(f"unknown model id {model_id!r}; known ids: {known}")

    def add(self, model_id: str, path: str | Path) -> ModelEntry:
        if not MODEL_ID.match(model_id):
            raise RequestError("id", "must be 1-64 characters of letters, digits, '.', '_' or '-'")
        if model_id == BUILTIN_MODEL:
            raise RequestError("id", f"{BUILTIN_MODEL!r} is the built-in model's id")
        target = Path(path).expanduser().resolve()
        data = self._read()
        data["models"][model_id] = {"path": str(target)}
        self._write(data)
        return ModelEntry(model_id, target)

    def remove(self, model_id: str) -> None:
        data = self._read()
        if model_id not in data["models"]:
            raise ModelNotFoundError(f"unknown model id {model_id!r}")
        del data["models"][model_id]
        self._write(data)

    def resolve(self, model: str | None, *, allow_paths: bool = True) -> ModelEntry:
        """An id, a path (when allowed), or None for the default model."""
        if model is None:
            return self.get(self.default_id)
        if any(e.id == model for e in self.entries()):
            return self.get(model)
        if allow_paths and (os.sep in model or Path(model).exists()):
            target = Path(model).expanduser()
            if not target.exists():
                raise ModelNotFoundError(f"no such file or folder: {target}")
            return ModelEntry(str(target), target.resolve())
        return self.get(model)

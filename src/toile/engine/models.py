"""The model registry: ids -> paths, kept in ``<toile home>/models.json``.

The built-in ``toile-mini`` is always present and is the default unless the file names another.
``--model`` accepts an id or a path; the server accepts ids only.

LoRAs have their own registry, ``<toile home>/loras.json`` (:class:`LoraRegistry`), for the same
reason: a server applies registered LoRA ids, never paths sent by its clients.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from toile.config import builtin_models_dir, toile_home
from toile.errors import ModelFormatError, ModelNotFoundError, RequestError

if TYPE_CHECKING:
    from toile.request import LoraSpec, Task

BUILTIN_MODEL = "toile-mini"
# Upscalers that are a resampling filter, no weights (A1111's "Lanczos" and "Nearest"), shipped
# as folders holding one toile_resize.json so they are models like any other (family "resize").
BUILTIN_UPSCALERS = ("lanczos", "bicubic", "nearest")
# toile's own reader (captions and answers), trained on the scene world: toile.train.reader_train.
BUILTIN_READER = "toile-reader"
# toile's super-resolution stage (4×): toile-mini's cascade to 256² and 1024², and the upscale
# task's default. toile.train.sr_train.
BUILTIN_SR = "toile-sr"
BUILTIN_IDS = (BUILTIN_MODEL, BUILTIN_READER, BUILTIN_SR, *BUILTIN_UPSCALERS)
# What a task runs on when nothing else is registered for it (the engine's default_model).
BUILTIN_TASK_DEFAULTS = {"generate": BUILTIN_MODEL, "upscale": BUILTIN_SR,
                         "caption": BUILTIN_READER, "answer": BUILTIN_READER}
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
        found = [ModelEntry(name, builtin_models_dir() / name, builtin=True)
                 for name in (BUILTIN_MODEL, BUILTIN_READER, BUILTIN_SR)]
        found += [ModelEntry(name, builtin_models_dir() / "upscalers" / name, builtin=True)
                  for name in BUILTIN_UPSCALERS]
        for model_id, spec in sorted(self._read()["models"].items()):
            path = spec.get("path") if isinstance(spec, dict) else spec
            found.append(ModelEntry(model_id, Path(str(path)).expanduser()))
        return found

    @property
    def default_id(self) -> str:
        return str(self._read().get("default", BUILTIN_MODEL))

    def task_default(self, task: Task) -> str | None:
        """The model set for ``task`` by ``toile models default ID --task TASK``, if any."""
        value = self._read().get("task_defaults", {})
        chosen = value.get(task.value) if isinstance(value, dict) else None
        return chosen if isinstance(chosen, str) else None

    def set_default(self, model_id: str, task: Task | None = None) -> None:
        """Make ``model_id`` the default model (for ``task`` only, when given)."""
        self.get(model_id)  # an unknown id is refused, naming the known ones
        data = self._read()
        if task is None:
            data["default"] = model_id
        else:
            defaults = data.get("task_defaults")
            data["task_defaults"] = (defaults if isinstance(defaults, dict) else {}) | {
                task.value: model_id}
        self._write(data)

    def get(self, model_id: str) -> ModelEntry:
        for entry in self.entries():
            if entry.id == model_id:
                return entry
        known = ", ".join(e.id for e in self.entries())
        raise ModelNotFoundError(f"unknown model id {model_id!r}; known ids: {known}")

    def add(self, model_id: str, path: str | Path) -> ModelEntry:
        if not MODEL_ID.match(model_id):
            raise RequestError("id", "must be 1-64 characters of letters, digits, '.', '_' or '-'")
        if model_id in BUILTIN_IDS:
            raise RequestError("id", f"{model_id!r} is a built-in model's id")
        target = Path(path).expanduser().resolve()
        data = self._read()
        data["models"][model_id] = {"path": str(target)}
        self._write(data)
        return ModelEntry(model_id, target)

    def remove(self, model_id: str) -> None:
        if model_id in BUILTIN_IDS:
            raise RequestError(
                "id",
                f"{model_id!r} is a built-in model: it ships with toile and cannot be "
                "removed (to use another model by default, pass --model)",
            )
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
                raise ModelNotFoundError.missing_path(target)
            return ModelEntry(str(target), target.resolve())
        return self.get(model)


def served_tasks(path: Path) -> frozenset[Task]:
    """The tasks the checkpoint at ``path`` serves, from its family's capability table (the
    family is detected from configs; nothing is loaded)."""
    from toile.families.registry import detect_family

    family = detect_family(path)
    modes = family.capabilities.get(family.variant(path), frozenset())
    return frozenset(mode.task for mode in modes)


# ---------------------------------------------------------------------------------- LoRAs
LORAS_FILE = "loras.json"


@dataclass(frozen=True)
class LoraEntry:
    """A registered LoRA: an id and the ``.safetensors`` file it names."""

    id: str
    path: Path

    def spec(self, scale: float = 1.0) -> LoraSpec:
        """The request-level :class:`~toile.request.LoraSpec` for this LoRA at ``scale``."""
        from toile.request import LoraSpec

        return LoraSpec(str(self.path), scale)

    def info(self) -> dict:
        """The training metadata ``toile finetune`` wrote into the file (``{}`` for others)."""
        from toile.io.lora_info import read_lora_info

        return read_lora_info(self.path)


class LoraRegistry:
    """LoRA ids -> ``.safetensors`` files, kept in ``<toile home>/loras.json``.

    This is how a server applies LoRAs without trusting paths from its clients: a client names
    a registered id (``spec(id, scale)`` turns it into the engine's ``LoraSpec``), and only the
    operator registers files (``toile loras add ID PATH``). The registry keeps an in-memory
    snapshot of the file; ``reload()`` re-reads it and ``reload_if_changed()`` does when the
    file changed, so a LoRA registered by another process (e.g. the CLI) is served without a
    restart (``toile.serve.loras``). Thread-safe.
    """

    def __init__(self, path: Path | None = None) -> None:
        import threading

        self.path = path if path is not None else toile_home() / LORAS_FILE
        self._lock = threading.RLock()
        self._entries: dict[str, LoraEntry] | None = None
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"LoRA registry {self.path} is not valid JSON: {exc}") from None
        loras = data.get("loras") if isinstance(data, dict) else None
        if not isinstance(loras, dict):
            raise ModelFormatError(f"LoRA registry {self.path} must hold {{'loras': {{id: ...}}}}")
        return loras

    def reload(self) -> list[LoraEntry]:
        """Re-read ``loras.json`` (call after ``toile loras add``); returns the entries."""
        with self._lock:
            self._stamp = self._file_stamp()
            loras = self._read()
            self._entries = {
                lora_id: LoraEntry(lora_id, Path(str(spec.get("path") if isinstance(spec, dict)
                                                     else spec)).expanduser())
                for lora_id, spec in sorted(loras.items())
            }
            return list(self._entries.values())

    def reload_if_changed(self) -> bool:
        """Re-read ``loras.json`` if it changed since the last read (one ``stat``): how a
        server picks up ``toile loras add`` without a restart. True if it re-read."""
        with self._lock:
            if self._entries is not None and self._file_stamp() == self._stamp:
                return False
            self.reload()
            return True

    def entries(self) -> list[LoraEntry]:
        """The registered LoRAs as of the last ``reload()`` (read on first use)."""
        with self._lock:
            if self._entries is None:
                return self.reload()
            return list(self._entries.values())

    def get(self, lora_id: str) -> LoraEntry:
        for entry in self.entries():
            if entry.id == lora_id:
                return entry
        known = ", ".join(e.id for e in self.entries()) or "none registered"
        raise RequestError("loras", f"unknown LoRA id {lora_id!r}; known ids: {known}")

    def spec(self, lora_id: str, scale: float = 1.0) -> LoraSpec:
        """``LoraSpec`` for a registered id; unknown ids and vanished files are RequestErrors."""
        entry = self.get(lora_id)
        if not entry.path.is_file():
            raise RequestError("loras", f"LoRA {lora_id!r}: its file {entry.path} is gone")
        return entry.spec(scale)

    def add(self, lora_id: str, path: str | Path) -> LoraEntry:
        """Register (or re-point) ``lora_id`` -> ``path`` after checking the file is a readable
        ``.safetensors``; writes ``loras.json`` atomically and updates this snapshot."""
        from toile.io.weights import refuse_pickle

        if not MODEL_ID.match(lora_id):
            raise RequestError("id", "must be 1-64 characters of letters, digits, '.', '_' or '-'")
        target = Path(path).expanduser().resolve()
        refuse_pickle(target)
        if target.suffix.lower() != ".safetensors" or not target.is_file():
            raise RequestError("path", f"{target} must be an existing .safetensors file")
        _check_safetensors_header(target)
        with self._lock:
            loras = self._read()
            loras[lora_id] = {"path": str(target)}
            self._write(loras)
            self.reload()
        return LoraEntry(lora_id, target)

    def remove(self, lora_id: str) -> None:
        with self._lock:
            loras = self._read()
            if lora_id not in loras:
                raise RequestError("id", f"unknown LoRA id {lora_id!r}")
            del loras[lora_id]
            self._write(loras)
            self.reload()

    def _write(self, loras: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"loras": loras}, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


def _check_safetensors_header(path: Path) -> None:
    """A malformed file is refused at registration, not when a request first uses it."""
    from toile.io.lora_info import check_lora_file

    check_lora_file(path)

"""Weight files: safetensors only, pickle formats refused, hashes for records."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from toile.errors import ModelFormatError, ModelNotFoundError, UnsafeFileError

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
CONVERT_HINT = (
    "pickle files can run arbitrary code when loaded, so toile only loads .safetensors. "
    'Convert it once, in an environment you trust, e.g.: python -c "import torch, safetensors.'
    "torch as st; sd = torch.load('IN', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\""
)


def refuse_pickle(path: str | Path) -> None:
    """Raise UnsafeFileError for a pickle-format weight file."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(f"refusing to load {path}: {CONVERT_HINT}")


# The libraries a model_index.json may name: diffusers looks up any other name as a module to
# import, and versions before 0.38 also ran a folder's own .py files (custom pipelines).
ALLOWED_LIBRARIES = frozenset({"diffusers", "transformers"})
MAX_SCANNED_FILES = 10_000


def check_folder_code(folder: str | Path) -> None:
    """Refuse a model folder that carries code or names a library other than diffusers or
    transformers: toile never runs code that comes with a model (whatever the diffusers
    version), and never imports a module a model folder names."""
    root = Path(folder)
    for count, path in enumerate(root.rglob("*")):
        if count >= MAX_SCANNED_FILES:
            break
        if path.suffix.lower() in (".py", ".pyc", ".so") and path.is_file():
            raise UnsafeFileError(
                f"refusing to load {root}: it contains code ({path.relative_to(root)}); toile "
                "never runs code that comes with a model — remove the file to load the weights"
            )
    index = root / "model_index.json"
    if not index.is_file():
        return
    try:
        components = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{index} is not valid JSON: {exc}") from None
    if not isinstance(components, dict):
        raise ModelFormatError(f"{index} must hold a JSON object")
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        if spec[0] not in ALLOWED_LIBRARIES:
            raise UnsafeFileError(
                f"refusing to load {root}: model_index.json names library {spec[0]!r} for "
                f"'{name}'; toile loads only {' and '.join(sorted(ALLOWED_LIBRARIES))} classes"
            )


def check_folder_weights(folder: str | Path) -> None:
    """A diffusers folder must hold its weights as safetensors, and no code
    (:func:`check_folder_code`).

    A component folder that has only pickle weights is refused (diffusers would otherwise fall
    back to ``torch.load``); one with a config but no weights at all names the missing file.
    """
    root = Path(folder)
    check_folder_code(root)
    index = root / "model_index.json"
    if not index.is_file():
        return
    components = json.loads(index.read_text())  # check_folder_code read it once already
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        sub = root / name
        if not (sub / "config.json").is_file():
            continue  # tokenizers, schedulers and feature extractors carry no weights
        if any(sub.glob("*.safetensors")):
            continue
        pickles = sorted(p.name for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeFileError(f"refusing to load {sub / pickles[0]}: {CONVERT_HINT}")
        raise ModelFormatError(
            f"missing weights for component '{name}': no *.safetensors file in {sub}"
        )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_hash(path: str | Path) -> str:
    """SHA-256 of a single file, or of a folder's weight files (sorted names + contents).

    Results are cached beside the user's config keyed by (path, size, mtime), because hashing a
    20 GB checkpoint on every load would dominate start-up.
    """
    target = Path(path)
    if not target.exists():
        raise ModelNotFoundError.missing_path(target)
    files = (
        [target]
        if target.is_file()
        else sorted(p for p in target.rglob("*.safetensors") if p.is_file())
    )
    cache_path = _hash_cache_path()
    cache = _read_cache(cache_path)
    digest = hashlib.sha256()
    changed = False
    single = ""
    for item in files:
        stat = item.stat()
        key = f"{item.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        value = cache.get(key)
        if value is None:
            value = file_sha256(item)
            cache[key] = value
            changed = True
        single = value
        if target.is_dir():
            digest.update(item.relative_to(target).as_posix().encode())
        digest.update(value.encode())
    if changed:
        _write_cache(cache_path, cache)
    return single if target.is_file() else digest.hexdigest()


def _hash_cache_path() -> Path:
    from toile.config import toile_home

    return toile_home() / "hash-cache.json"


def _read_cache(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(path: Path, cache: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not stop generation

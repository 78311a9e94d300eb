"""Weight files: safetensors only, pickle formats refused, hashes for records."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from toile.errors import ModelFormatError, ModelNotFoundError, UnsafeFileError, one_line

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
    components = read_json_object(index)
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        if not isinstance(spec[0], str) or spec[0] not in ALLOWED_LIBRARIES:
            raise UnsafeFileError(
                f"refusing to load {root}: model_index.json names library "
                f"{one_line(repr(spec[0]), 80)} for '{one_line(name, 80)}'; toile loads only "
                f"{' and '.join(sorted(ALLOWED_LIBRARIES))} classes"
            )


def check_folder_weights(folder: str | Path) -> None:
    """A diffusers folder must hold its weights as safetensors, and no code
    (:func:`check_folder_code`), and configs that are JSON objects (:func:`check_folder_configs`).

    A component folder that has only pickle weights is refused (diffusers would otherwise fall
    back to ``torch.load``); one with a config but no weights at all names the missing file.
    """
    root = Path(folder)
    check_folder_code(root)
    check_folder_configs(root)
    for name, sub in _components(root):
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


def _components(root: Path) -> list[tuple[str, Path]]:
    """(name, folder) of each component a folder's ``model_index.json`` names."""
    index = root / "model_index.json"
    if not index.is_file():
        return []
    components = read_json_object(index)
    found = []
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ModelFormatError(
                f"{index} names a component {one_line(repr(name), 80)}, which is not a folder "
                "name"
            )
        found.append((name, root / name))
    return found


def check_folder_configs(folder: str | Path) -> None:
    """Each component's ``config.json`` / ``scheduler_config.json`` must be a JSON object whose
    layer counts its weights can back (:func:`check_layer_counts`).

    Why here and not in the loaders: diffusers takes a config that is a JSON *string* for the id
    of a Hugging Face Hub repository and tries to download it, whatever ``local_files_only``
    says; and a config asking for 10**30 layers keeps it building them until memory runs out.
    """
    for _, sub in _components(Path(folder)):
        for name in ("config.json", "scheduler_config.json"):
            if (sub / name).is_file():
                config = read_json_object(sub / name)
                check_layer_counts(config, sub / name, sorted(sub.glob("*.safetensors")))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object, or a one-line ModelFormatError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise ModelFormatError(f"{path} is not valid JSON: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


# Config keys that count layers or blocks a model is built of (diffusers and transformers).
LAYER_COUNT_KEYS = frozenset({
    "num_hidden_layers", "num_layers", "layers_per_block", "transformer_layers_per_block",
    "num_single_layers", "encoder_layers", "decoder_layers", "n_layer", "num_blocks",
    "num_hidden_groups", "inner_group_num",
})


def check_layer_counts(config: dict[str, Any], path: Path, weights: list[Path]) -> None:
    """A model of N layers has at least N tensors: refuse a config whose layer counts are more
    than its weight files hold tensors, before a library builds them one by one (a config that
    asks for 10**30 layers would hold the loader for ever). Unreadable weights are left to the
    loader to report."""
    declared = []
    for key, value in config.items():
        if key in LAYER_COUNT_KEYS:
            for count in value if isinstance(value, list) else [value]:
                if isinstance(count, int) and not isinstance(count, bool):
                    declared.append((count, key))
    if not declared or not weights:
        return
    largest, key = max(declared)
    if largest <= 1000:  # fewer than any real checkpoint's tensors: no need to read headers
        return
    from safetensors import safe_open

    tensors = 0
    for weight in weights:
        try:
            with safe_open(str(weight), framework="pt") as handle:
                tensors += len(handle.keys())
        except Exception:  # the loader reports a malformed file in its own words
            return
    if largest > tensors:
        raise ModelFormatError(
            f"{path} gives {key} = {largest}, but its weights hold only {tensors} tensors; "
            "a model has at least one tensor per layer"
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
        cache = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: Path, cache: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not stop generation

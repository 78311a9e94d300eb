"""Which families exist, and which one a checkpoint on disk belongs to.

Families are named here by module path and imported on first use, so listing them costs
nothing and a family's heavy imports happen only when that family is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from toile.errors import ModelFormatError, ModelNotFoundError, one_line
from toile.families.base import Family
from toile.io.weights import refuse_pickle

if TYPE_CHECKING:
    from toile.samplers import SamplerMenu

# Order matters: the first family whose detect() accepts a checkpoint wins, so more specific
# layouts (SDXL refiner, Flux Fill) are checked by their family before more general ones.
FAMILY_CLASSES: dict[str, str] = {
    "toile": "toile.families.toile.family:ToileFamily",
    "flux": "toile.families.flux:FluxFamily",
    "sd3": "toile.families.sd3:SD3Family",
    "sdxl": "toile.families.sdxl:SDXLFamily",
    "sd": "toile.families.sd:StableDiffusionFamily",
    "if": "toile.families.deepfloyd_if:IFFamily",
    "sd-upscale": "toile.families.sd_upscale:SDUpscaleFamily",
    "reader": "toile.families.reader:ReaderFamily",
    "resize": "toile.families.resize:ResizeFamily",
}


@cache
def get_family(name: str) -> Family:
    target = FAMILY_CLASSES.get(name)
    if target is None:
        raise ModelFormatError(
            f"unknown family {name!r}; known families: {', '.join(FAMILY_CLASSES)}"
        )
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)()


def available_families() -> list[str]:
    """Families whose module is present in this installation."""
    names = []
    for name, target in FAMILY_CLASSES.items():
        module_name = target.partition(":")[0]
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:  # the family's parent package is not installed
            found = False
        if found:
            names.append(name)
    return names


def detect_family(path: str | Path) -> Family:
    """The family of the checkpoint at ``path``; a clear error says what was found otherwise."""
    target = Path(path)
    if not target.exists():
        raise ModelNotFoundError.missing_path(target)
    if target.is_file():
        refuse_pickle(target)
    for name in available_families():
        family = get_family(name)
        if family.detect(target):
            return family
    raise ModelFormatError(
        f"cannot tell which model family {target} is: {one_line(describe(target), 500)}"
    )


def describe(target: Path) -> str:
    """A short description of what is at ``target``, for error messages."""
    if target.is_dir():
        index = target / "model_index.json"
        if index.is_file():
            try:
                data = json.loads(index.read_text())
            except (OSError, ValueError, RecursionError):
                return f"{index} is not valid JSON"
            if not isinstance(data, dict):
                return f"{index} holds a JSON {type(data).__name__}, not an object"
            name = one_line(repr(data.get("_class_name")), 80)
            return f"a diffusers folder whose pipeline class is {name}"
        entries = sorted(p.name for p in target.iterdir())[:12]
        return "a folder without model_index.json containing: " + (", ".join(entries) or "nothing")
    if target.suffix.lower() != ".safetensors":
        return (
            f"a {target.suffix or 'suffix-less'} file; toile loads .safetensors files and folders"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(target), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # malformed header: report it rather than crash
        return f"a .safetensors file that cannot be read ({one_line(exc)})"
    prefixes = sorted({k.split(".")[0] for k in keys})[:8]
    return f"a .safetensors file with {len(keys)} tensors, top-level keys: {', '.join(prefixes)}"


def checkpoint_samplers(path: str | Path) -> SamplerMenu | None:
    """The samplers the checkpoint at ``path`` can use, from its configs (nothing is loaded);
    None when its scheduler is not declared on disk (a single file: load it to know)."""
    from toile.families.diffusers_common import declared_scheduler_class
    from toile.samplers import menu_for

    family = detect_family(path)
    own = declared_scheduler_class(Path(path))
    return menu_for(family, own) if own is not None else None

"""Single-file checkpoints: the original ``.safetensors`` layouts A1111 and ComfyUI load.

Most checkpoints on users' disks are one file in the layout their authors trained in
(``model.diffusion_model.*`` for the denoiser, ``first_stage_model.*`` for the VAE,
``cond_stage_model.*`` / ``conditioner.embedders.*`` for the text encoders), not diffusers
folders. diffusers' ``from_single_file`` converts them, but it needs the diffusers configs and
tokenizers, which such a file does not contain, and would fetch them from the Hub. toile never
fetches at run time, so it looks for them next to the file by convention:

- a folder ``NAME/`` beside ``NAME.safetensors``, or
- a folder ``config/`` in the same directory,

holding a diffusers layout; the weights in it are not needed for the components the file
holds (``model_index.json``, ``unet/config.json``, ``vae/config.json``, ``tokenizer/``...).

A family names its layout with a :class:`SingleFileLayout` (which key prefixes must be present)
and loads through :func:`load_file_pipeline`; only the header of the file is read to detect it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.errors import ModelFormatError, one_line

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SingleFileLayout:
    """One family's original single-file layout."""

    title: str  # the family as users call it, for messages: "SDXL"
    required: tuple[str, ...]  # key prefixes that must all occur
    reference: str  # the diffusers repository whose configs fit (named in the error)
    denoiser: str = "unet"  # the denoiser's component folder in that repository


def tensor_names(path: Path) -> tuple[str, ...]:
    """Tensor names from a ``.safetensors`` header (no weights are read); () if unreadable.

    Detection asks every family and loading asks again, so the header of a file is read once
    per version of it (path, size and modification time).
    """
    try:
        stat = path.stat()
    except OSError:
        return ()
    return _header_names(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _header_names(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return tuple(handle.keys())
    except Exception:  # a malformed header is "not this family"; describe() reports it
        return ()


def is_single_file(path: Path, layout: SingleFileLayout) -> bool:
    """Whether ``path`` is a ``.safetensors`` file in ``layout``."""
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    names = tensor_names(path)
    return all(any(name.startswith(prefix) for name in names) for prefix in layout.required)


def config_folder(path: Path, layout: SingleFileLayout) -> Path:
    """The local diffusers config folder for ``NAME.safetensors``: ``NAME/`` or ``config/``."""
    from toile.io.weights import check_folder_code, check_folder_configs

    candidates = [path.with_suffix(""), path.parent / "config"]
    for folder in candidates:
        if (folder / "model_index.json").is_file():
            check_folder_code(folder)
            check_folder_configs(folder)
            return folder
    raise ModelFormatError(
        f"{path} is an {layout.title} single-file checkpoint, which holds weights but no "
        f"configs or tokenizers; toile loads offline, so put a diffusers layout without "
        f"weights (model_index.json, {layout.denoiser}/config.json, vae/config.json, "
        f"text_encoder*/config.json, tokenizer*/, scheduler/) in {candidates[0]}/ "
        f"(or {candidates[1]}/). "
        f"Copying those files from the matching diffusers repository "
        f"(e.g. {layout.reference}) is enough."
    )


def configs_of(path: Path, layout: SingleFileLayout) -> Path:
    """Where the diffusers configs of a checkpoint are: the folder itself, or a single file's
    companion folder."""
    return config_folder(path, layout) if path.is_file() else path


def load_file_pipeline(
    pipeline_cls: Any, path: Path, config: Path, device: str, dtype: torch.dtype, **kwargs: Any
) -> Any:
    """``pipeline_cls.from_single_file`` with a local config folder, offline; a failure is a
    ``ModelFormatError`` naming the file and the folder."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        pipe = pipeline_cls.from_single_file(
            str(path), config=str(config), local_files_only=True, dtype=dtype, **kwargs
        )
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as exc:
        raise ModelFormatError(
            f"cannot load {path} as {pipeline_cls.__name__} with the configs in {config}: "
            f"{one_line(exc, 500)}"
        ) from None
    except Exception as exc:  # e.g. safetensors' own error on a tensor it cannot read
        raise ModelFormatError(
            f"cannot load {path} as {pipeline_cls.__name__} with the configs in {config}: "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from None
    _finish_components(pipe, path)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _finish_components(pipe: Any, path: Path) -> None:
    """Finish what diffusers' single-file load leaves undone for the text encoders it builds:

    - it builds them on the meta device and fills them from the file, so tied parameters
      (T5's ``encoder.embed_tokens`` is ``shared``) stay empty unless re-tied, and a tensor
      missing from the file would surface as a confusing "cannot copy out of meta tensor" when
      the pipeline moves to its device: tie, then refuse what is still empty, by name;
    - it leaves T5 in training mode, so its dropout (0.1) would make every image random
      whatever the seed: every module is put in eval mode, as ``from_pretrained`` does.
    """
    for name, component in pipe.components.items():
        if not hasattr(component, "named_parameters"):
            continue
        component.eval()
        if hasattr(component, "tie_weights"):
            component.tie_weights()
        empty = [key for key, tensor in [*component.named_parameters(),
                                         *component.named_buffers()] if tensor.is_meta]
        if empty:
            raise ModelFormatError(
                f"{path} lacks {len(empty)} tensor(s) of its {name} "
                f"({type(component).__name__}), e.g. {', '.join(empty[:3])}"
            )

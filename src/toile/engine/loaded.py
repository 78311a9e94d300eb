"""What the engine holds for a loaded model, and what it tells callers about one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toile.engine.models import ModelEntry
    from toile.families.base import Family, LoadedModel
    from toile.resolve import FamilyDefaults
    from toile.samplers import SamplerMenu


@dataclass
class CachedModel:
    """What :meth:`Engine.load` returns: the registry entry, the family, the loaded model, the
    checkpoint's hash and how long loading took. The engine's cache holds these; callers that
    only check requests use :meth:`Engine.model_info` instead."""

    entry: ModelEntry
    family: Family
    loaded: LoadedModel
    model_hash: str
    load_s: float


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model declares, for callers that check requests before running them
    (the server, at submit): ``resolve(request, info.defaults, info.family, info.samplers)``
    gives the same answer the run would."""

    id: str
    family: str
    defaults: FamilyDefaults
    samplers: SamplerMenu | None

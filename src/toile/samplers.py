"""Samplers and schedules: one name per algorithm, A1111's, used everywhere a user reads one (the
image record, the A1111 infotext, ``/sdapi/v1/samplers``, the CLI, the web page).

A sampler is a diffusers scheduler class (plus config overrides, e.g. DPM++ 2M SDE is
``DPMSolverMultistepScheduler`` with ``algorithm_type="sde-dpmsolver++"``), following diffusers'
own A1111 -> diffusers table. A schedule is A1111's "Schedule type": how the noise levels are
spaced (``karras`` = Karras et al. 2022's sigmas, ``exponential``, ``beta`` = Lee et al. 2024's
beta sigmas, ``sgm_uniform`` = trailing timestep spacing); ``automatic`` keeps the checkpoint's.

The scheduler that runs is built from the checkpoint's own scheduler config with the sampler's
class (``cls.from_config(config, **overrides)``, as diffusers documents the swap), so training-
time settings (prediction type, betas, shift) carry over. Which samplers apply depends on the
checkpoint: noise-prediction models (ε or v: SD 1.x/2.x, SDXL) take the ε samplers; flow-matching
models (SD3, FLUX.1, toile's own) the flow variants. Nothing here imports torch or diffusers at
import time.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from toile.errors import RequestError

# What A1111 clients send for "the model's own sampler".
DEFAULT_SAMPLER = "Default"


class Schedule(StrEnum):
    """A1111's schedule types that diffusers' schedulers implement."""

    AUTOMATIC = "automatic"
    KARRAS = "karras"
    EXPONENTIAL = "exponential"
    BETA = "beta"
    SGM_UNIFORM = "sgm_uniform"


# Schedule -> (the scheduler __init__ argument that must exist, config overrides).
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
SCHEDULE_OVERRIDES: Mapping[Schedule, tuple[str, dict[str, Any]]] = MappingProxyType({
    Schedule.KARRAS: ("use_karras_sigmas", {"use_karras_sigmas": True}),
    Schedule.EXPONENTIAL: ("use_exponential_sigmas", {"use_exponential_sigmas": True}),
    Schedule.BETA: ("use_beta_sigmas", {"use_beta_sigmas": True}),
    Schedule.SGM_UNIFORM: ("timestep_spacing", {"timestep_spacing": "trailing"}),
})
SCHEDULE_LABELS: Mapping[Schedule, str] = MappingProxyType({
    Schedule.AUTOMATIC: "Automatic",
    Schedule.KARRAS: "Karras",
    Schedule.EXPONENTIAL: "Exponential",
    Schedule.BETA: "Beta",
    Schedule.SGM_UNIFORM: "SGM Uniform",
})


@dataclass(frozen=True)
class Sampler:
    """One sampling algorithm: its A1111 name, the diffusers class and config overrides that
    implement it, and A1111's old ``k_...`` aliases."""

    name: str
    scheduler_class: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    # Stochastic steps need the run's generator at every step; SD3's and FLUX.1's pipelines
    # do not hand it to ``scheduler.step``, so there a seed would not reproduce: offered only
    # where the family samples in its own loop (toile's).
    own_loop_only: bool = False


# Noise-prediction models (ε or v): diffusers' A1111 table.
EPSILON_SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a",)),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m",)),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++"}, aliases=("k_dpmpp_2m_sde",)),
    Sampler("DPM++ SDE", "DPMSolverSinglestepScheduler", aliases=("k_dpmpp_sde",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",)),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",)),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",)),
    Sampler("DDIM", "DDIMScheduler"),
    # PLMS as A1111 and SD run it: the linear multistep part only (PNDM without its Runge-Kutta
    # warm-up steps).
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("UniPC", "UniPCMultistepScheduler"),
    Sampler("LCM", "LCMScheduler"),
    Sampler("DDPM", "DDPMScheduler"),
)
# Flow-matching models: the flow variants diffusers has (DPM-Solver++ and UniPC on flow sigmas,
# with the checkpoint's shift).
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler", "FlowMatchEulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("Euler a", "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True},
            aliases=("k_euler_a",), own_loop_only=True),
    Sampler("Heun", "FlowMatchHeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", _FLOW, aliases=("k_dpmpp_2m",)),
    Sampler("UniPC", "UniPCMultistepScheduler", _FLOW),
)
ALL_NAMES: tuple[str, ...] = tuple(dict.fromkeys(s.name for s in EPSILON_SAMPLERS + FLOW_SAMPLERS))
# A1111 before 1.9 named sampler and schedule together ("DPM++ 2M Karras"); still accepted.
_LEGACY_SUFFIXES = {" karras": Schedule.KARRAS, " exponential": Schedule.EXPONENTIAL}


def is_flow_scheduler(scheduler_class: str) -> bool:
    return scheduler_class.startswith("FlowMatch")


def sampler_name(scheduler_class: str | None) -> str:
    """The user-facing name of a diffusers scheduler class (the class name itself when A1111 has
    none; ``Default`` when unknown)."""
    if not scheduler_class:
        return DEFAULT_SAMPLER
    table = FLOW_SAMPLERS if is_flow_scheduler(scheduler_class) else EPSILON_SAMPLERS
    found = _by_class(table, scheduler_class)
    return found.name if found is not None else scheduler_class


def _by_class(table: tuple[Sampler, ...], scheduler_class: str) -> Sampler | None:
    """The sampler a checkpoint's own scheduler class is: the one without overrides first
    (DPMSolverMultistep is DPM++ 2M, not 2M SDE), else the class's only entry (PNDM: PLMS)."""
    matches = [s for s in table if s.scheduler_class == scheduler_class]
    return min(matches, key=lambda s: bool(s.overrides)) if matches else None


def split_legacy_name(name: str) -> tuple[str, Schedule | None]:
    """``"DPM++ 2M Karras"`` -> (``"DPM++ 2M"``, karras); other names unchanged."""
    lowered = name.lower()
    for suffix, schedule in _LEGACY_SUFFIXES.items():
        if lowered.endswith(suffix):
            return name[: -len(suffix)], schedule
    return name, None


def parse_schedule(value: str | None, field_name: str = "schedule") -> Schedule | None:
    """A schedule name (A1111's spelling or label, any case); None for "not given"."""
    if value is None:
        return None
    key = value.strip().lower().replace(" ", "_")
    for schedule in Schedule:
        if key == schedule.value or key == SCHEDULE_LABELS[schedule].lower().replace(" ", "_"):
            return schedule
    allowed = ", ".join(s.value for s in Schedule)
    raise RequestError(field_name, f"unknown schedule {value!r}; known schedules: {allowed}")


def check_sampler_name(value: str | None, field_name: str = "sampler") -> None:
    """Refuse a name no family knows (before any model loads); which ones apply to the chosen
    model is checked by :class:`SamplerMenu`."""
    if value is None:
        return
    base, _ = split_legacy_name(value.strip())
    if _find(EPSILON_SAMPLERS + FLOW_SAMPLERS, base) is None and base.lower() not in (
        DEFAULT_SAMPLER.lower(), "automatic"
    ):
        raise RequestError(
            field_name,
            f"unknown sampler {value!r}; known samplers: {', '.join(ALL_NAMES)} "
            "(or diffusers scheduler class names)",
        )


def _find(table: tuple[Sampler, ...], name: str) -> Sampler | None:
    """By A1111 name or alias (any case), else by diffusers class name."""
    key = name.strip().lower()
    for sampler in table:
        if key in (sampler.name.lower(), *sampler.aliases):
            return sampler
    classes = {s.scheduler_class.lower(): s.scheduler_class for s in table}
    return _by_class(table, classes[key]) if key in classes else None


def _init_arguments(scheduler_class: str) -> set[str]:
    import diffusers

    cls = getattr(diffusers, scheduler_class)
    return set(inspect.signature(cls.__init__).parameters)


def _set_timesteps_arguments(scheduler_class: str) -> set[str]:
    import diffusers

    cls = getattr(diffusers, scheduler_class)
    return set(inspect.signature(cls.set_timesteps).parameters)


@dataclass(frozen=True)
class Choice:
    """What runs: the sampler and schedule, by name, and how to build its scheduler."""

    sampler: Sampler
    schedule: Schedule

    @property
    def name(self) -> str:
        return self.sampler.name

    def build(self, base_config: Mapping[str, Any]) -> Any:
        """The scheduler, from the checkpoint's own config with the sampler's class."""
        import diffusers

        overrides = dict(self.sampler.overrides)
        if overrides.get("use_flow_sigmas"):
            overrides["flow_shift"] = float(base_config.get("shift", 1.0))
        if self.schedule is not Schedule.AUTOMATIC:
            overrides.update(dict.fromkeys(_SIGMA_FLAGS, False))
            overrides.update(SCHEDULE_OVERRIDES[self.schedule][1])
        cls = getattr(diffusers, self.sampler.scheduler_class)
        return cls.from_config(dict(base_config), **overrides)


@dataclass(frozen=True)
class SamplerMenu:
    """The samplers and schedules one checkpoint can use.

    ``own_class`` is the scheduler class its config declares (what ``Default`` and "no sampler
    given" run). ``pipeline_passes_sigmas``: the family's pipeline hands explicit sigmas to
    ``set_timesteps`` (FLUX.1's does), so only schedulers that accept them apply.
    ``restrict_to``: a family whose sampling is its own (toile's) lists what it implements.
    """

    own_class: str
    pipeline_passes_sigmas: bool = False
    restrict_to: tuple[str, ...] | None = None

    @property
    def flow(self) -> bool:
        return is_flow_scheduler(self.own_class)

    def samplers(self) -> tuple[Sampler, ...]:
        table = FLOW_SAMPLERS if self.flow else EPSILON_SAMPLERS
        found = []
        for sampler in table:
            if self.restrict_to is not None and sampler.name not in self.restrict_to:
                continue
            if sampler.own_loop_only and self.restrict_to is None:
                continue
            if self.pipeline_passes_sigmas and "sigmas" not in _set_timesteps_arguments(
                sampler.scheduler_class
            ):
                continue
            found.append(sampler)
        return tuple(found)

    def own(self) -> Sampler:
        """The checkpoint's own sampler (running it with ``automatic`` swaps nothing)."""
        found = _by_class(self.samplers(), self.own_class)
        # A class with no A1111 name: itself, as is.
        return found if found is not None else Sampler(self.own_class, self.own_class)

    def schedules(self, sampler: Sampler) -> tuple[Schedule, ...]:
        """The schedules ``sampler`` supports on this checkpoint (``automatic`` always)."""
        if self.restrict_to is not None:
            return (Schedule.AUTOMATIC,)
        if sampler.overrides.get("use_flow_sigmas"):
            return (Schedule.AUTOMATIC,)  # flow sigmas replace the sigma spacing
        arguments = _init_arguments(sampler.scheduler_class)
        return (Schedule.AUTOMATIC, *(
            schedule for schedule, (argument, _) in SCHEDULE_OVERRIDES.items()
            if argument in arguments and not (self.flow and schedule is Schedule.SGM_UNIFORM)
        ))

    def choose(self, sampler: str | None, schedule: str | None,
               fields: tuple[str, str] = ("sampler", "schedule")) -> Choice:
        """The request's names -> what runs; a name that does not apply is a RequestError
        listing those that do."""
        sampler_field, schedule_field = fields
        wanted = parse_schedule(schedule, schedule_field)
        chosen = self.own()
        if sampler is not None and sampler.strip().lower() not in (
            DEFAULT_SAMPLER.lower(), "automatic", ""
        ):
            base, legacy = split_legacy_name(sampler.strip())
            if legacy is not None and wanted in (None, Schedule.AUTOMATIC):
                wanted = legacy
            found = _find(self.samplers(), base) or (
                chosen if base.lower() in (chosen.name.lower(), chosen.scheduler_class.lower())
                else None
            )
            if found is None:
                names = ", ".join(s.name for s in self.samplers()) or chosen.name
                raise RequestError(
                    sampler_field,
                    f"{sampler!r} does not apply to this model; it can use: {names}",
                )
            chosen = found
        wanted = wanted or Schedule.AUTOMATIC
        allowed = self.schedules(chosen)
        if wanted not in allowed:
            raise RequestError(
                schedule_field,
                f"{wanted.value!r} does not apply to {chosen.name} on this model; it can use: "
                f"{', '.join(s.value for s in allowed)}",
            )
        return Choice(chosen, wanted)


def menu_for(family: Any, own_class: str) -> SamplerMenu:
    """The menu of a checkpoint of ``family`` whose scheduler config declares ``own_class``.
    Families say what limits them with optional attributes: ``pipeline_passes_sigmas`` (FLUX.1's
    pipelines hand their own sigmas to ``set_timesteps``), ``fixed_sampler`` (DeepFloyd IF: each
    stage keeps its scheduler, DDPM with learned variance) and ``own_samplers`` (toile: the
    samplers its own sampling code implements)."""
    restrict = getattr(family, "own_samplers", None)
    if getattr(family, "fixed_sampler", False):
        restrict = (sampler_name(own_class),)
    return SamplerMenu(
        own_class,
        pipeline_passes_sigmas=getattr(family, "pipeline_passes_sigmas", False),
        restrict_to=tuple(restrict) if restrict is not None else None,
    )


@contextlib.contextmanager
def scheduler_swapped(
    pipelines: Mapping[Any, Any], menu: SamplerMenu | None, choice: Choice | None
) -> Iterator[None]:
    """For one run, every diffusers pipeline in ``pipelines`` whose scheduler is the checkpoint's
    own gets the scheduler ``choice`` builds (one instance per pipeline: schedulers keep per-run
    state); the originals come back afterwards, also on error. The checkpoint's own sampler with
    the automatic schedule changes nothing, so the default path is diffusers' exactly."""
    targets = []
    if menu is not None and choice is not None and choice != Choice(menu.own(), Schedule.AUTOMATIC):
        for pipe in dict.fromkeys(pipelines.values()):
            scheduler = getattr(pipe, "scheduler", None)
            if type(scheduler).__name__ == menu.own_class:
                targets.append((pipe, scheduler))
    try:
        for pipe, own in targets:
            pipe.scheduler = choice.build(own.config)  # type: ignore[union-attr]
        yield
    finally:
        for pipe, own in targets:
            pipe.scheduler = own

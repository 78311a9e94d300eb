"""Sampler names: one name per sampling algorithm, A1111's, used everywhere a user reads one
(the image record, the A1111 infotext, ``/sdapi/v1/samplers``, the web page). The diffusers
scheduler class a checkpoint declares is the alias."""

from __future__ import annotations

# diffusers scheduler class -> the name AUTOMATIC1111 gives the same sampler.
SAMPLER_NAMES = {
    "EulerDiscreteScheduler": "Euler",
    "FlowMatchEulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
    "DDPMScheduler": "DDPM",
}
# What A1111 clients send for "the model's own sampler".
DEFAULT_SAMPLER = "Default"


def sampler_name(scheduler_class: str | None) -> str:
    """The sampler's user-facing name for a diffusers scheduler class name (the class name
    itself for a class with no A1111 name; ``Default`` when unknown)."""
    return SAMPLER_NAMES.get(scheduler_class or "", scheduler_class or DEFAULT_SAMPLER)

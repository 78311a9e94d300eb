"""The installed libraries against the ranges toile declares (pyproject's dependencies).

pip warns about a conflicting upgrade but installs it; the user then meets the break deep in a
run as a library's traceback (e.g. transformers 5.24 refusing peft 0.21 when a LoRA is added to a
text encoder). Checking the declared ranges once, at start, turns that into one line naming the
packages and versions. ``TOILE_SKIP_VERSION_CHECK=1`` skips it for a user who knows better.
"""

from __future__ import annotations

import functools
import os
from importlib import metadata

from toile.errors import ToileError

DISTRIBUTION = "toile"
SKIP_ENV = "TOILE_SKIP_VERSION_CHECK"


def version_problems(extras: tuple[str, ...] = ()) -> list[str]:
    """One message per declared dependency (and those of ``extras``) whose installed version is
    outside toile's range or that is missing. Empty when toile itself is not installed (a bare
    source tree declares nothing)."""
    from packaging.requirements import Requirement

    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    problems = []
    for text in declared:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue  # an extra nobody asked for
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} is not installed (toile needs {requirement})")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(
                f"{requirement.name} {installed} is installed but toile needs "
                f"{requirement.name}{requirement.specifier}"
            )
    return problems


@functools.cache
def check_versions(extras: tuple[str, ...] = ()) -> None:
    """Raise one ToileError naming every out-of-range library (once per process)."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    problems = version_problems(extras)
    if problems:
        raise ToileError(
            "incompatible libraries: " + "; ".join(problems) + ". Install the tested versions "
            "(`pip install -r requirements.lock` in a toile checkout, which `make setup` does) or "
            f"the ranges above; {SKIP_ENV}=1 skips this check"
        )

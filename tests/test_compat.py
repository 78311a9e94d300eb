"""Library versions out of toile's declared ranges are one clear line, not a traceback."""

from __future__ import annotations

from importlib import metadata

import pytest

from toile import compat
from toile.errors import ToileError


def test_the_locked_environment_is_in_range():
    assert compat.version_problems(("serve", "dev")) == []


def test_an_upgraded_library_is_named_with_both_versions(monkeypatch):
    real = metadata.version

    def fake(name: str) -> str:
        return "5.24.0" if name == "transformers" else real(name)

    monkeypatch.setattr(compat.metadata, "version", fake)
    problems = compat.version_problems()
    assert len(problems) == 1
    assert problems[0].startswith("transformers 5.24.0 is installed but toile needs transformers")
    assert "<5.24" in problems[0]
    compat.check_versions.cache_clear()
    try:
        with pytest.raises(ToileError) as info:
            compat.check_versions()
        message = str(info.value)
        assert "\n" not in message and "transformers 5.24.0" in message
        assert "requirements.lock" in message
        monkeypatch.setenv(compat.SKIP_ENV, "1")
        compat.check_versions.cache_clear()
        compat.check_versions()  # skipped on request
    finally:
        compat.check_versions.cache_clear()


def test_a_missing_library_is_named(monkeypatch):
    real = metadata.version

    def fake(name: str) -> str:
        if name == "peft":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(compat.metadata, "version", fake)
    [problem] = compat.version_problems()
    assert problem.startswith("peft is not installed (toile needs peft>=")

"""Generated requests (schemathesis, from toile's own OpenAPI schema) against a real server:
no undocumented 5xx, no hang, a server that still answers. A short seeded run; the README's
counts come from `python -m toile.tools.api_fuzz --n 500`."""

from __future__ import annotations

import pytest

pytest.importorskip("schemathesis")


def test_generated_requests_find_nothing(tmp_path):
    from toile.tools.api_fuzz import fuzz, served

    with served(tmp_path / "data") as base_url:
        tallies = fuzz(base_url, n=8, seed=0, hang_s=10.0)
    assert sum(t.requests for t in tallies.values()) > 60
    assert {name: t.findings for name, t in tallies.items() if t.findings} == {}
    assert "POST /v1/jobs" in tallies and "POST /sdapi/v1/txt2img" in tallies

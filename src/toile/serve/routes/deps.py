"""Shared route helpers."""

from __future__ import annotations

from fastapi import Request

from toile.serve.jobs import JobService


def jobs(request: Request) -> JobService:
    """The app's JobService (set up by the lifespan in ``create_app``)."""
    return request.app.state.jobs

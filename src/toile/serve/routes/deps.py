"""Shared route helpers."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from toile.serve.jobs import JobService


def jobs(request: Request) -> JobService:
    """The app's JobService (set up by the lifespan in ``create_app``)."""
    return request.app.state.jobs


@dataclass(frozen=True)
class Caller:
    """Who is asking: a configured client (sees and owns only its jobs), or the admin / a
    server without client tokens (sees every job)."""

    client: str = ""

    @property
    def owner(self) -> str:
        """The owner a job this caller submits gets."""
        return self.client

    @property
    def scope(self) -> str | None:
        """The owner to filter by (None: every job)."""
        return self.client or None


def caller(request: Request) -> Caller:
    """The caller the security middleware identified by its token."""
    return Caller(request.scope.get("state", {}).get("toile_client", ""))

"""What every job queue (SQLite, PostgreSQL) hands back: jobs, their images and texts, and the
errors a write can raise. Plain frozen dataclasses, so nothing outside a queue module ever
holds a database row or connection."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from toile.errors import ToileError
from toile.serve.spec import JobSpec, JobStatus


class QueueFullError(Exception):
    """The queue holds ``max_queue`` jobs already; the client should retry later."""


class ClientQueueFullError(QueueFullError):
    """One client has ``max_queued_per_client`` jobs waiting already (a 429: that client, not
    the server, is over its share)."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused with a different request body."""

    def __init__(self, job: JobRow) -> None:
        self.job = job
        super().__init__(f"Idempotency-Key was already used for job {job.id} with another body")


class StoreDamagedError(ToileError):
    """The job queue's database cannot be read (a damaged file, a foreign schema)."""


@dataclass(frozen=True)
class ImageRow:
    id: str
    job_id: str
    index: int
    file: str  # a file name inside the images folder, never a client-supplied path
    record: dict[str, Any]


@dataclass(frozen=True)
class TextRow:
    """A caption or answer a job wrote, with its record."""

    job_id: str
    index: int
    text: str
    record: dict[str, Any]


@dataclass(frozen=True)
class JobRow:
    seq: int
    id: str
    status: JobStatus
    spec: JobSpec | None  # None only when the stored spec is damaged (see ``damaged``)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    error: str | None = None
    error_field: str | None = None
    webhook: str | None = None
    webhook_status: str | None = None
    idempotency_key: str | None = None
    body_hash: str = ""
    images: tuple[ImageRow, ...] = field(default=())
    texts: tuple[TextRow, ...] = field(default=())
    owner: str = ""  # the client (server config [clients]) that submitted it; "" = none
    # Why the stored spec cannot be read (a damaged row); the worker fails such a job with
    # this reason instead of stopping on it, and listings still show it.
    damaged: str | None = None
    worker_id: str | None = None  # the worker holding the job's lease while it runs
    lease_until: float | None = None  # epoch seconds (the database's clock for PostgreSQL)

    @property
    def terminal(self) -> bool:
        return self.status.terminal


@dataclass(frozen=True)
class Heartbeat:
    """What a worker learns when it renews a lease: whether it still holds the job (False: the
    lease expired and the job went back to the queue, or it ended) and whether a client asked
    to cancel it."""

    held: bool
    cancel_requested: bool


def json_object(text: Any) -> tuple[dict[str, Any], str | None]:
    """A stored JSON object, or ``({}, why)`` when the row is damaged: one bad row must not
    stop the queue or the job listing."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}, "not valid JSON"
    if not isinstance(value, dict):
        return {}, "not a JSON object"
    return value, None


def stored_spec(text: Any) -> tuple[JobSpec | None, str | None]:
    """The stored spec, or ``(None, why)`` for a damaged row."""
    value, damaged = json_object(text)
    if damaged is not None:
        return None, damaged
    try:
        return JobSpec.from_dict(value), None
    except (TypeError, ValueError, ToileError, KeyError) as exc:
        return None, f"not a job spec: {exc}"

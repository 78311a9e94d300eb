"""The job queue's interface: what :class:`~toile.serve.jobs.JobService` and the
:class:`~toile.serve.worker.Worker` need from a queue, whichever database holds it.

Two implementations share their SQL (:mod:`toile.serve.sqlqueue`): SQLite
(:class:`~toile.serve.store.JobStore`, the embedded default: one process, one worker) and
PostgreSQL (:class:`~toile.serve.queue_pg.PgQueue`: API processes and workers on many
machines).

Leases: ``claim_next`` gives the job to one worker until ``lease_s`` seconds from now; the worker
renews it with ``heartbeat`` while it runs. A worker that stops renewing (``kill -9``, a machine
gone) loses the job: ``expire_leases`` puts it back in the queue (the attempt counts against
``max_attempts``), and ``finish`` with a ``worker_id`` only applies while that worker still holds
the job, so a job is never completed twice.

Fairness: ``claim_next`` serves clients (``owner``) round-robin, each client's jobs oldest
first; ``prefer_models`` (the models a worker has loaded) only reorders within the chosen
client's own queue, a bounded number of times per job (see ``sqlqueue``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from toile.serve.rows import Heartbeat, ImageRow, JobRow, TextRow
from toile.serve.spec import JobSpec, JobStatus

LEASE_S = 30.0  # how long a claim lasts without a heartbeat (config: lease_s)


class JobQueue(Protocol):
    """A durable job queue; every method is thread-safe and each write is one transaction."""

    # -- writes --------------------------------------------------------------------------------

    def insert(
        self,
        job_id: str,
        spec: JobSpec,
        *,
        body_hash: str,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        max_queue: int | None = None,
        owner: str = "",
        max_per_client: int | None = None,
    ) -> tuple[JobRow, bool]: ...

    def claim_next(
        self, worker_id: str = "", lease_s: float = LEASE_S, prefer_models: Sequence[str] = ()
    ) -> JobRow | None: ...

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float = LEASE_S) -> Heartbeat: ...

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        error_field: str | None = None,
        images: Iterable[ImageRow] = (),
        texts: Iterable[TextRow] = (),
        worker_id: str | None = None,
    ) -> JobRow | None: ...

    def requeue(self, job_id: str, worker_id: str | None = None) -> None: ...

    def cancel(self, job_id: str) -> tuple[JobRow | None, bool]: ...

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]: ...

    def expire_leases(self, max_attempts: int) -> list[JobRow]: ...

    def delete_ended_before(self, cutoff: float) -> list[JobRow]: ...

    def set_webhook_status(self, job_id: str, status: str) -> None: ...

    def touch_worker(self, worker_id: str, device: str, models: Sequence[str]) -> None: ...

    def close(self) -> None: ...

    # -- reads ---------------------------------------------------------------------------------

    def get_by_key(self, idempotency_key: str) -> JobRow | None: ...

    def get(self, job_id: str) -> JobRow | None: ...

    def list(
        self, statuses: Sequence[JobStatus] = (), limit: int = 100, owner: str | None = None
    ) -> list[JobRow]: ...

    def queue_position(self, job: JobRow) -> int | None: ...

    def counts(self) -> dict[JobStatus, int]: ...

    def image(self, image_id: str) -> ImageRow | None: ...

    def pending_webhooks(self) -> list[JobRow]: ...

    def live_workers(self, within_s: float) -> int: ...

"""The job queue's SQL, shared by SQLite (``store.JobStore``) and PostgreSQL
(``queue_pg.PgQueue``): both hold the same tables and run the same statements, so a rule (the
claim order, leases, attempts) is written once. A subclass supplies the connection, the
transactions, its placeholder style, its clock and its row locking.

Tables (see each backend for the DDL): ``jobs`` (one row per job: status, request JSON, lease),
``images`` and ``texts`` (results), ``client_turns`` (when each client last had a job claimed,
as a counter: the round-robin order) and ``workers`` (who claimed lately, for ``/health``).

The claim rule (:meth:`SqlQueue.claim_next`):

1. The clients with queued jobs, in turn order: the one whose last claim is oldest first (a
   client never served counts as oldest), ties by their oldest queued job. So one client's 500
   queued jobs take every other turn at most, and another client's one job runs next.
2. That client's queued jobs, oldest first; the first one not locked by a concurrent claim.
3. Model affinity: when the worker holds some models and the client's oldest job needs another,
   a younger job of the *same client* on a held model may go first, but only while no older job
   of that client has been passed over ``MAX_PASSES`` times: affinity never takes another
   client's turn and never starves a job.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from toile.serve.queue import LEASE_S
from toile.serve.rows import (
    ClientQueueFullError,
    Heartbeat,
    IdempotencyConflict,
    ImageRow,
    JobRow,
    QueueFullError,
    TextRow,
    json_object,
    stored_spec,
)
from toile.serve.spec import TERMINAL, JobSpec, JobStatus

log = logging.getLogger("toile.serve")
QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
AFFINITY_WINDOW = 8  # how many of a client's oldest jobs affinity may choose among
MAX_PASSES = 3  # how often a job may be passed over by its own client's younger jobs
WORKER_ROWS_KEPT_S = 86400.0  # a worker not seen for a day is forgotten


def pick_with_affinity(rows: Sequence[Any], prefer_models: Sequence[str]) -> int:
    """The index in ``rows`` (one client's queued jobs, oldest first, with ``model`` and
    ``passed_over``) of the job to claim; see the module docstring, rule 3."""
    if not prefer_models or rows[0]["model"] in prefer_models:
        return 0
    for index, row in enumerate(rows):
        if index and row["model"] in prefer_models:
            return index
        if row["passed_over"] >= MAX_PASSES:  # this one may wait no longer
            return 0
    return 0


class SqlQueue:
    """The shared SQL of a :class:`~toile.serve.queue.JobQueue`. Subclasses implement the
    hooks in the first section."""

    placeholder = "?"
    lock_rows = ""  # appended to a claim's SELECT: PostgreSQL's " FOR UPDATE SKIP LOCKED"
    stopped_reason = "the server stopped while running this job"
    expired_reason = "its worker stopped responding (lease expired) while running this job"

    # -- hooks --------------------------------------------------------------------------------

    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        """One write transaction; yields a connection (``execute(sql, args)``)."""
        raise NotImplementedError

    def _reading(self) -> contextlib.AbstractContextManager[Any]:
        """A connection for a few reads."""
        raise NotImplementedError

    def _now(self, db: Any) -> float:
        """Epoch seconds by the queue's clock (PostgreSQL: the database server's, so leases
        of workers on machines with skewed clocks still compare)."""
        raise NotImplementedError

    def _unique_violation(self, exc: BaseException) -> bool:
        """True when ``exc`` is a concurrent insert of the same idempotency key."""
        return False

    def close(self) -> None:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------

    def _exec(self, db: Any, sql: str, args: Sequence[Any] = ()) -> Any:
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        return db.execute(sql, tuple(args))

    def _one(self, db: Any, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._exec(db, sql, args).fetchone()

    def _all(self, db: Any, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return list(self._exec(db, sql, args).fetchall())

    def _job(self, db: Any, row: Any) -> JobRow | None:
        if row is None:
            return None
        images = tuple(
            ImageRow(r["id"], r["job_id"], r["idx"], r["file"], json_object(r["record"])[0])
            for r in self._all(db, "SELECT * FROM images WHERE job_id = ? ORDER BY idx",
                               (row["id"],))
        )
        texts = tuple(
            TextRow(r["job_id"], r["idx"], r["text"], json_object(r["record"])[0])
            for r in self._all(db, "SELECT * FROM texts WHERE job_id = ? ORDER BY idx",
                               (row["id"],))
        )
        spec, damaged = stored_spec(row["request"])
        return JobRow(
            seq=row["seq"],
            id=row["id"],
            status=JobStatus(row["status"]),
            spec=spec,
            damaged=f"its stored request is damaged ({damaged})" if damaged else None,
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            attempts=row["attempts"],
            cancel_requested=bool(row["cancel_requested"]),
            error=row["error"],
            error_field=row["error_field"],
            webhook=row["webhook"],
            webhook_status=row["webhook_status"],
            idempotency_key=row["idempotency_key"],
            body_hash=row["body_hash"],
            images=images,
            texts=texts,
            owner=row["owner"],
            worker_id=row["worker_id"],
            lease_until=row["lease_until"],
        )

    def _by_id(self, db: Any, job_id: str) -> JobRow | None:
        return self._job(db, self._one(db, "SELECT * FROM jobs WHERE id = ?", (job_id,)))

    # -- submit -------------------------------------------------------------------------------

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
    ) -> tuple[JobRow, bool]:
        """Add a queued job, durably. Returns ``(job, created)``; with a key seen before, the
        earlier job and ``False`` (or IdempotencyConflict if the body differs). Two API
        processes inserting the same key at once: the loser retries and finds the winner's."""
        for attempt in (1, 2):
            try:
                return self._insert(job_id, spec, body_hash, idempotency_key, webhook,
                                    max_queue, owner, max_per_client)
            except Exception as exc:
                if attempt == 2 or not self._unique_violation(exc):
                    raise
        raise AssertionError("unreachable")

    def _insert(
        self, job_id: str, spec: JobSpec, body_hash: str, idempotency_key: str | None,
        webhook: str | None, max_queue: int | None, owner: str, max_per_client: int | None,
    ) -> tuple[JobRow, bool]:
        with self._transaction() as db:
            if idempotency_key is not None:
                existing = self._job(db, self._one(
                    db, "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)))
                if existing is not None:
                    if existing.body_hash != body_hash:
                        raise IdempotencyConflict(existing)
                    return existing, False
            self._check_limits(db, owner, max_queue, max_per_client)
            self._exec(
                db,
                "INSERT INTO jobs (id, idempotency_key, body_hash, status, request, webhook, "
                "created_at, owner, model) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, idempotency_key, body_hash, QUEUED, spec.to_json(), webhook,
                 self._now(db), owner, spec.model),
            )
            job = self._by_id(db, job_id)
        assert job is not None
        return job, True

    def _check_limits(
        self, db: Any, owner: str, max_queue: int | None, max_per_client: int | None
    ) -> None:
        if max_queue is not None:
            waiting = self._one(
                db, "SELECT COUNT(*) AS n FROM jobs WHERE status IN (?, ?)", (QUEUED, RUNNING)
            )["n"]
            if waiting >= max_queue:
                raise QueueFullError(f"the queue is full ({waiting} jobs); retry later")
        if max_per_client:
            queued = self._one(
                db, "SELECT COUNT(*) AS n FROM jobs WHERE status = ? AND owner = ?",
                (QUEUED, owner),
            )["n"]
            if queued >= max_per_client:
                who = f"client {owner!r}" if owner else "this client"
                raise ClientQueueFullError(
                    f"{who} has {queued} queued jobs, the limit (max_queued_per_client) is "
                    f"{max_per_client}; retry when some have started"
                )

    # -- claim, lease, finish -----------------------------------------------------------------

    def claim_next(
        self, worker_id: str = "", lease_s: float = LEASE_S, prefer_models: Sequence[str] = ()
    ) -> JobRow | None:
        """The next job by the claim rule (module docstring), now ``running`` with one more
        attempt and leased to ``worker_id`` for ``lease_s`` seconds; None if none waits."""
        with self._transaction() as db:
            for owner in self._owners_in_turn(db):
                rows = self._all(
                    db,
                    "SELECT id, model, passed_over FROM jobs WHERE status = ? AND owner = ? "
                    f"ORDER BY seq LIMIT ?{self.lock_rows}",
                    (QUEUED, owner, AFFINITY_WINDOW),
                )
                if rows:  # else every one is being claimed by another worker right now
                    return self._claim(db, rows, pick_with_affinity(rows, prefer_models),
                                       owner, worker_id, lease_s)
        return None

    def _owners_in_turn(self, db: Any) -> list[str]:
        rows = self._all(
            db,
            "SELECT j.owner AS owner FROM jobs j LEFT JOIN client_turns t ON t.owner = j.owner "
            "WHERE j.status = ? GROUP BY j.owner, t.last_turn "
            "ORDER BY COALESCE(t.last_turn, 0), MIN(j.seq)",
            (QUEUED,),
        )
        return [row["owner"] for row in rows]

    def _claim(
        self, db: Any, rows: Sequence[Any], chosen: int, owner: str, worker_id: str,
        lease_s: float,
    ) -> JobRow | None:
        now = self._now(db)
        job_id = rows[chosen]["id"]
        for passed in rows[:chosen]:
            self._exec(db, "UPDATE jobs SET passed_over = passed_over + 1 WHERE id = ?",
                       (passed["id"],))
        self._exec(
            db,
            "UPDATE jobs SET status = ?, attempts = attempts + 1, started_at = ?, worker_id = ?, "
            "lease_until = ? WHERE id = ?",
            (RUNNING, now, worker_id, now + lease_s, job_id),
        )
        turn = self._one(db, "SELECT COALESCE(MAX(last_turn), 0) + 1 AS n FROM client_turns")["n"]
        self._exec(
            db,
            "INSERT INTO client_turns (owner, last_turn) VALUES (?, ?) "
            "ON CONFLICT (owner) DO UPDATE SET last_turn = excluded.last_turn",
            (owner, turn),
        )
        return self._by_id(db, job_id)

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float = LEASE_S) -> Heartbeat:
        """Renew the lease while ``worker_id`` still holds the running job."""
        with self._transaction() as db:
            now = self._now(db)
            held = self._exec(
                db,
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND worker_id = ? AND status = ?",
                (now + lease_s, job_id, worker_id, RUNNING),
            ).rowcount
            row = self._one(db, "SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return Heartbeat(held=held > 0, cancel_requested=bool(row and row["cancel_requested"]))

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
    ) -> JobRow | None:
        """Move a running job to a terminal state, with its images and texts in the same
        transaction. The image files must already be on disk (fsynced): the row is the commit
        point. With ``worker_id``, only while that worker holds the job: a worker whose lease
        was lost (the job re-queued, maybe run elsewhere) gets None and keeps nothing."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        held = " AND worker_id = ?" if worker_id is not None else ""
        with self._transaction() as db:
            moved = self._exec(
                db,
                "UPDATE jobs SET status = ?, finished_at = ?, error = ?, error_field = ?, "
                f"lease_until = NULL WHERE id = ? AND status = ?{held}",
                (status, self._now(db), error, error_field, job_id, RUNNING,
                 *((worker_id,) if worker_id is not None else ())),
            ).rowcount
            if not moved:
                return None
            for image in images:
                self._exec(
                    db,
                    "INSERT INTO images (id, job_id, idx, file, record) VALUES (?, ?, ?, ?, ?)",
                    (image.id, job_id, image.index, image.file, json.dumps(image.record)),
                )
            for text in texts:
                self._exec(
                    db, "INSERT INTO texts (job_id, idx, text, record) VALUES (?, ?, ?, ?)",
                    (job_id, text.index, text.text, json.dumps(text.record)),
                )
            return self._by_id(db, job_id)

    def requeue(self, job_id: str, worker_id: str | None = None) -> None:
        """Put an interrupted running job back (graceful shutdown); the attempt does not count."""
        held = " AND worker_id = ?" if worker_id is not None else ""
        with self._transaction() as db:
            self._exec(
                db,
                "UPDATE jobs SET status = ?, started_at = NULL, worker_id = NULL, "
                "lease_until = NULL, attempts = CASE WHEN attempts > 0 THEN attempts - 1 "
                f"ELSE 0 END WHERE id = ? AND status = ?{held}",
                (QUEUED, job_id, RUNNING, *((worker_id,) if worker_id is not None else ())),
            )

    def cancel(self, job_id: str) -> tuple[JobRow | None, bool]:
        """A queued job becomes ``cancelled`` at once (it will never start); a running one gets
        ``cancel_requested`` (durable: the worker's heartbeat sees it, and a crash before it
        stops does not resurrect it) and the caller signals the worker. Terminal jobs are left
        as they are. Returns the job and whether this call moved it from queued to cancelled."""
        with self._transaction() as db:
            moved = self._exec(
                db,
                "UPDATE jobs SET status = ?, finished_at = ?, cancel_requested = 1 "
                "WHERE id = ? AND status = ?",
                (JobStatus.CANCELLED, self._now(db), job_id, QUEUED),
            ).rowcount
            self._exec(
                db, "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = ?",
                (job_id, RUNNING),
            )
            return self._by_id(db, job_id), moved > 0

    # -- jobs whose worker is gone ------------------------------------------------------------

    def _recover_running(
        self, max_attempts: int, expired_only: bool
    ) -> tuple[list[str], list[str], list[str]]:
        """Running jobs whose worker is gone (all of them, or those whose lease expired) go
        back to the queue, or fail with a reason after ``max_attempts`` starts, or end
        cancelled if that was asked. Returns the (requeued, failed, cancelled) ids."""
        requeued: list[str] = []
        failed: list[str] = []
        cancelled: list[str] = []
        with self._transaction() as db:
            now = self._now(db)
            expired = " AND lease_until < ?" if expired_only else ""
            rows = self._all(
                db,
                "SELECT id, attempts, cancel_requested FROM jobs "
                f"WHERE status = ?{expired} ORDER BY seq{self.lock_rows}",
                (RUNNING, *((now,) if expired_only else ())),
            )
            why = self.expired_reason if expired_only else self.stopped_reason
            for row in rows:
                ended = "UPDATE jobs SET status = ?, finished_at = ?, error = ?, " \
                        "worker_id = NULL, lease_until = NULL WHERE id = ?"
                if row["cancel_requested"]:
                    self._exec(db, ended, (JobStatus.CANCELLED, now, None, row["id"]))
                    cancelled.append(row["id"])
                elif row["attempts"] >= max_attempts:
                    reason = (f"{why} {row['attempts']} times (limit {max_attempts}); "
                              "not retried again")
                    self._exec(db, ended, (JobStatus.FAILED, now, reason, row["id"]))
                    failed.append(row["id"])
                else:
                    self._exec(
                        db,
                        "UPDATE jobs SET status = ?, started_at = NULL, worker_id = NULL, "
                        "lease_until = NULL WHERE id = ?",
                        (QUEUED, row["id"]),
                    )
                    requeued.append(row["id"])
        return requeued, failed, cancelled

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Jobs left ``running`` by workers that are gone go back to the queue or fail (see
        ``_recover_running``); returns the (requeued, failed) ids. SQLite: every running job,
        at start-up (its one worker died with the server); PostgreSQL: expired leases."""
        requeued, failed, _ = self._recover_running(max_attempts, expired_only=False)
        return requeued, failed

    def expire_leases(self, max_attempts: int) -> list[JobRow]:
        """Running jobs whose lease expired: re-queued, or ended (failed after
        ``max_attempts``, or cancelled as asked). Returns the ended jobs, for their events."""
        requeued, failed, cancelled = self._recover_running(max_attempts, expired_only=True)
        if requeued or failed:
            log.warning("leases expired: %d job(s) re-queued, %d failed after %d attempts",
                        len(requeued), len(failed), max_attempts)
        return [job for job_id in failed + cancelled if (job := self.get(job_id)) is not None]

    # -- housekeeping -------------------------------------------------------------------------

    def delete_ended_before(self, cutoff: float) -> list[JobRow]:
        """Delete the jobs that ended before ``cutoff`` (epoch seconds) with their image and text
        rows; returns them (the caller removes their files)."""
        with self._transaction() as db:
            rows = self._all(
                db,
                f"SELECT * FROM jobs WHERE status IN ({', '.join('?' * len(TERMINAL))}) "
                "AND finished_at < ?",
                (*sorted(TERMINAL), cutoff),
            )
            jobs = [job for row in rows if (job := self._job(db, row)) is not None]
            for job in jobs:
                for table, column in (("images", "job_id"), ("texts", "job_id"), ("jobs", "id")):
                    self._exec(db, f"DELETE FROM {table} WHERE {column} = ?", (job.id,))
            return jobs

    def set_webhook_status(self, job_id: str, status: str) -> None:
        with self._transaction() as db:
            self._exec(db, "UPDATE jobs SET webhook_status = ? WHERE id = ?",
                       (status[:500], job_id))

    def touch_worker(self, worker_id: str, device: str, models: Sequence[str]) -> None:
        """A worker says it is alive (and what it holds): ``/health`` of an API process."""
        with self._transaction() as db:
            now = self._now(db)
            self._exec(
                db,
                "INSERT INTO workers (id, device, models, seen_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET device = excluded.device, "
                "models = excluded.models, seen_at = excluded.seen_at",
                (worker_id, device, json.dumps(list(models)), now),
            )
            self._exec(db, "DELETE FROM workers WHERE seen_at < ?", (now - WORKER_ROWS_KEPT_S,))

    # -- reads --------------------------------------------------------------------------------

    def get_by_key(self, idempotency_key: str) -> JobRow | None:
        with self._reading() as db:
            return self._job(db, self._one(
                db, "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)))

    def get(self, job_id: str) -> JobRow | None:
        with self._reading() as db:
            return self._by_id(db, job_id)

    def list(
        self, statuses: Sequence[JobStatus] = (), limit: int = 100, owner: str | None = None
    ) -> list[JobRow]:
        """The newest ``limit`` jobs (optionally of some statuses), oldest first."""
        clauses, args = [], list(statuses)
        if statuses:
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
        if owner is not None:  # a client sees its own jobs only
            clauses.append("owner = ?")
            args.append(owner)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._reading() as db:
            rows = self._all(
                db,
                f"SELECT * FROM (SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ?) AS recent "
                "ORDER BY seq",
                (*args, limit),
            )
            return [job for row in rows if (job := self._job(db, row)) is not None]

    def queue_position(self, job: JobRow) -> int | None:
        """1 = next to run, by the claim rule (affinity aside): the job is its client's
        ``r``-th, and every other client with queued jobs gets a turn before each of them
        (``r`` turns when that client's turn comes first, else ``r - 1``). None unless the job
        is queued."""
        if job.status is not QUEUED:
            return None
        with self._reading() as db:
            rank = self._one(
                db, "SELECT COUNT(*) AS n FROM jobs WHERE status = ? AND owner = ? AND seq <= ?",
                (QUEUED, job.owner, job.seq),
            )["n"]
            clients = self._all(
                db,
                "SELECT j.owner AS owner, COUNT(*) AS n, MIN(j.seq) AS head, "
                "COALESCE(t.last_turn, 0) AS turn FROM jobs j "
                "LEFT JOIN client_turns t ON t.owner = j.owner WHERE j.status = ? "
                "GROUP BY j.owner, t.last_turn",
                (QUEUED,),
            )
        if not rank:
            return None  # claimed or cancelled between the caller's read and this one
        mine = next(((c["turn"], c["head"]) for c in clients if c["owner"] == job.owner), None)
        ahead = sum(
            min(c["n"], rank if mine is None or (c["turn"], c["head"]) < mine else rank - 1)
            for c in clients if c["owner"] != job.owner
        )
        return int(rank + ahead)

    def counts(self) -> dict[JobStatus, int]:
        with self._reading() as db:
            rows = self._all(db, "SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        found = dict.fromkeys(JobStatus, 0)
        found.update({JobStatus(row["status"]): int(row["n"]) for row in rows})
        return found

    def image(self, image_id: str) -> ImageRow | None:
        with self._reading() as db:
            r = self._one(db, "SELECT * FROM images WHERE id = ?", (image_id,))
        if r is None:
            return None
        return ImageRow(r["id"], r["job_id"], r["idx"], r["file"], json_object(r["record"])[0])

    def pending_webhooks(self) -> list[JobRow]:
        """Finished jobs whose webhook was never attempted (the server stopped first)."""
        with self._reading() as db:
            rows = self._all(
                db,
                "SELECT * FROM jobs WHERE webhook IS NOT NULL AND webhook_status IS NULL "
                f"AND status IN ({', '.join('?' * len(TERMINAL))}) ORDER BY seq",
                tuple(sorted(TERMINAL)),
            )
            return [job for row in rows if (job := self._job(db, row)) is not None]

    def live_workers(self, within_s: float) -> int:
        """How many workers said they were alive in the last ``within_s`` seconds."""
        with self._reading() as db:
            now = self._now(db)
            row = self._one(db, "SELECT COUNT(*) AS n FROM workers WHERE seen_at >= ?",
                            (now - within_s,))
        return int(row["n"])

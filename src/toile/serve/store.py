"""The durable job queue: one SQLite file in WAL mode with ``synchronous=FULL``.

Why these settings: a job answered with a 2xx must survive ``kill -9`` and power loss. With
``synchronous=FULL`` every commit is fsynced to the WAL before ``commit()`` returns, so a job
is on disk before the client hears "accepted". WAL lets readers (GET routes) run while the worker
writes. Every state change is one short ``BEGIN IMMEDIATE`` transaction, so two writers (or a
second server sharing the file) never interleave a read-then-write.

Live progress is *not* stored here: it changes every step and means nothing after a restart
(see ``events``). Status, attempts, errors, result images and texts are.

States (:class:`~toile.serve.spec.JobStatus`): ``queued -> running -> succeeded | failed |
cancelled``; ``queued -> cancelled``. A job found ``running`` at start-up was interrupted by a
crash: it goes back to ``queued``, or to ``failed`` with a reason once it has been started
``max_attempts`` times (a job that kills the server every time must not loop forever).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toile.errors import ToileError
from toile.serve.spec import TERMINAL, JobSpec, JobStatus

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING  # the two states SQL here tests most
# 2: jobs.owner (the client that submitted); 3: texts (caption and answer results), and
# jobs.request holds a JobSpec (schema 2's request JSON reads as one).
SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    body_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    webhook TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_field TEXT,
    webhook_status TEXT,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx INTEGER NOT NULL,
    file TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_by_job ON images (job_id, idx);
CREATE TABLE IF NOT EXISTS texts (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
"""


class QueueFullError(Exception):
    """The queue holds ``max_queue`` jobs already; the client should retry later."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused with a different request body."""

    def __init__(self, job: JobRow) -> None:
        self.job = job
        super().__init__(f"Idempotency-Key was already used for job {job.id} with another body")


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

    @property
    def terminal(self) -> bool:
        return self.status.terminal


def _json_object(text: Any) -> tuple[dict[str, Any], str | None]:
    """A stored JSON object, or ``({}, why)`` when the row is damaged: one bad row must not
    stop the queue or the job listing."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}, "not valid JSON"
    if not isinstance(value, dict):
        return {}, "not a JSON object"
    return value, None


def _spec(text: Any) -> tuple[JobSpec | None, str | None]:
    """The stored spec, or ``(None, why)`` for a damaged row."""
    value, damaged = _json_object(text)
    if damaged is not None:
        return None, damaged
    try:
        return JobSpec.from_dict(value), None
    except (TypeError, ValueError, ToileError, KeyError) as exc:
        return None, f"not a job spec: {exc}"


class StoreDamagedError(ToileError):
    """``jobs.sqlite3`` cannot be read as a database."""


class JobStore:
    """All reads and writes of ``jobs.sqlite3``. Thread-safe: one connection behind a lock
    (the writes are tiny; a pool would add nothing but another way to get locking wrong)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # 0600 before SQLite opens it: its -wal and -shm files take the database's permissions.
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        # isolation_level=None: autocommit, so every transaction here is explicit.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreDamagedError(
                f"{path} is damaged ({exc}): stop toile serve, move the file aside (it holds the "
                "job queue and history; result PNGs in images/ are not affected) and start again "
                "to create a new one; `sqlite3 OLD.sqlite3 .recover | sqlite3 NEW.sqlite3` may "
                "salvage its rows"
            ) from None

    def _setup(self) -> None:
        path = self.path
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout = 10000")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{path}: SQLite refused WAL mode (got {mode})")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        with self._transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{path} was written by a newer toile (schema {version})")
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "owner" not in columns:  # schema 1 -> 2: jobs from before belong to no client
                self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def pragma(self, name: str) -> Any:
        with self._lock:
            return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    # -- transactions -------------------------------------------------------------------------

    class _Tx:
        def __init__(self, store: JobStore) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
            try:
                self.store._db.execute("COMMIT" if kind is None else "ROLLBACK")
            finally:
                self.store._lock.release()

    def _transaction(self) -> JobStore._Tx:
        return JobStore._Tx(self)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- rows ---------------------------------------------------------------------------------

    def _job(self, db: sqlite3.Connection, row: sqlite3.Row | None) -> JobRow | None:
        if row is None:
            return None
        images = tuple(
            ImageRow(r["id"], r["job_id"], r["idx"], r["file"], _json_object(r["record"])[0])
            for r in db.execute("SELECT * FROM images WHERE job_id = ? ORDER BY idx", (row["id"],))
        )
        texts = tuple(
            TextRow(r["job_id"], r["idx"], r["text"], _json_object(r["record"])[0])
            for r in db.execute("SELECT * FROM texts WHERE job_id = ? ORDER BY idx", (row["id"],))
        )
        spec, damaged = _spec(row["request"])
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
        )

    # -- writes -------------------------------------------------------------------------------

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
    ) -> tuple[JobRow, bool]:
        """Add a queued job, durably. Returns ``(job, created)``; with a key seen before, the
        earlier job and ``False`` (or IdempotencyConflict if the body differs)."""
        with self._transaction() as db:
            if idempotency_key is not None:
                existing = self._job(
                    db,
                    db.execute(
                        "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                    ).fetchone(),
                )
                if existing is not None:
                    if existing.body_hash != body_hash:
                        raise IdempotencyConflict(existing)
                    return existing, False
            if max_queue is not None:
                waiting = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", (QUEUED, RUNNING)
                ).fetchone()[0]
                if waiting >= max_queue:
                    raise QueueFullError(f"the queue is full ({waiting} jobs); retry later")
            db.execute(
                "INSERT INTO jobs (id, idempotency_key, body_hash, status, request, webhook, "
                "created_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    idempotency_key,
                    body_hash,
                    QUEUED,
                    spec.to_json(),
                    webhook,
                    time.time(),
                    owner,
                ),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            job = self._job(db, row)
        assert job is not None
        return job, True

    def claim_next(self) -> JobRow | None:
        """The oldest queued job, now ``running`` with one more attempt; None if none waits."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = ?, attempts = attempts + 1, started_at = ? WHERE id = ?",
                (RUNNING, time.time(), row["id"]),
            )
            return self._job(
                db, db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
            )

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        error_field: str | None = None,
        images: Iterable[ImageRow] = (),
        texts: Iterable[TextRow] = (),
    ) -> JobRow | None:
        """Move a running job to a terminal state, with its images and texts in the same
        transaction. The image files must already be on disk (fsynced): the row is the commit
        point."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        with self._transaction() as db:
            for image in images:
                db.execute(
                    "INSERT INTO images (id, job_id, idx, file, record) VALUES (?, ?, ?, ?, ?)",
                    (image.id, job_id, image.index, image.file, json.dumps(image.record)),
                )
            for text in texts:
                db.execute(
                    "INSERT INTO texts (job_id, idx, text, record) VALUES (?, ?, ?, ?)",
                    (job_id, text.index, text.text, json.dumps(text.record)),
                )
            db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ?, error_field = ? "
                "WHERE id = ? AND status = ?",
                (status, time.time(), error, error_field, job_id, RUNNING),
            )
            return self._job(
                db, db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            )

    def requeue(self, job_id: str) -> None:
        """Put an interrupted running job back (graceful shutdown); the attempt does not count."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status = ?, started_at = NULL, attempts = MAX(attempts - 1, 0) "
                "WHERE id = ? AND status = ?",
                (QUEUED, job_id, RUNNING),
            )

    def cancel(self, job_id: str) -> tuple[JobRow | None, bool]:
        """A queued job becomes ``cancelled`` at once (it will never start); a running one gets
        ``cancel_requested`` (durable, so a crash before it stops does not resurrect it) and the
        caller signals the worker. Terminal jobs are left as they are. Returns the job and
        whether this call moved it from queued to cancelled."""
        with self._transaction() as db:
            now = time.time()
            moved = db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, cancel_requested = 1 "
                "WHERE id = ? AND status = ?",
                (JobStatus.CANCELLED, now, job_id, QUEUED),
            ).rowcount
            db.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = ?",
                (job_id, RUNNING),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(db, row), moved > 0

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """At start-up: jobs left ``running`` by a crash go back to the queue, or fail with a
        reason after ``max_attempts`` starts, or are cancelled if that was asked. Returns the
        (requeued, failed) ids."""
        requeued, failed = [], []
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, attempts, cancel_requested FROM jobs WHERE status = ?", (RUNNING,)
            ).fetchall()
            now = time.time()
            for row in rows:
                if row["cancel_requested"]:
                    db.execute(
                        "UPDATE jobs SET status = ?, finished_at = ? WHERE id = ?",
                        (JobStatus.CANCELLED, now, row["id"]),
                    )
                elif row["attempts"] >= max_attempts:
                    reason = (
                        f"the server stopped while running this job {row['attempts']} times "
                        f"(limit {max_attempts}); not retried again"
                    )
                    db.execute(
                        "UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                        (JobStatus.FAILED, now, reason, row["id"]),
                    )
                    failed.append(row["id"])
                else:
                    db.execute(
                        "UPDATE jobs SET status = ?, started_at = NULL WHERE id = ?",
                        (QUEUED, row["id"]),
                    )
                    requeued.append(row["id"])
        return requeued, failed

    def delete_ended_before(self, cutoff: float) -> list[JobRow]:
        """Delete the jobs that ended before ``cutoff`` (epoch seconds) with their image and text
        rows; returns them (the caller removes their files)."""
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT * FROM jobs WHERE status IN ({', '.join('?' * len(TERMINAL))}) "
                "AND finished_at < ?",
                (*sorted(TERMINAL), cutoff),
            ).fetchall()
            jobs = [job for row in rows if (job := self._job(db, row)) is not None]
            for job in jobs:
                db.execute("DELETE FROM images WHERE job_id = ?", (job.id,))
                db.execute("DELETE FROM texts WHERE job_id = ?", (job.id,))
                db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
            return jobs

    def set_webhook_status(self, job_id: str, status: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET webhook_status = ? WHERE id = ?", (status[:500], job_id))

    # -- reads --------------------------------------------------------------------------------

    def get_by_key(self, idempotency_key: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            return self._job(self._db, row)

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(self._db, row)

    def list(
        self, statuses: Sequence[JobStatus] = (), limit: int = 100, owner: str | None = None
    ) -> list[JobRow]:
        """The newest ``limit`` jobs (optionally of some statuses), oldest first: queue order."""
        clauses, args = [], list(statuses)
        if statuses:
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
        if owner is not None:  # a client sees its own jobs only
            clauses.append("owner = ?")
            args.append(owner)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM (SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ?) "
                "ORDER BY seq",
                (*args, limit),
            ).fetchall()
            return [job for row in rows if (job := self._job(self._db, row)) is not None]

    def queue_position(self, job: JobRow) -> int | None:
        """1 = next to run. None unless the job is queued."""
        if job.status is not QUEUED:
            return None
        rows = self._read(
            "SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?", (QUEUED, job.seq)
        )
        return int(rows[0][0]) + 1

    def counts(self) -> dict[JobStatus, int]:
        rows = self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        found = dict.fromkeys(JobStatus, 0)
        found.update({JobStatus(row[0]): int(row[1]) for row in rows})
        return found

    def image(self, image_id: str) -> ImageRow | None:
        rows = self._read("SELECT * FROM images WHERE id = ?", (image_id,))
        if not rows:
            return None
        r = rows[0]
        return ImageRow(r["id"], r["job_id"], r["idx"], r["file"], _json_object(r["record"])[0])

    def pending_webhooks(self) -> list[JobRow]:
        """Finished jobs whose webhook was never attempted (the server stopped first)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE webhook IS NOT NULL AND webhook_status IS NULL "
                f"AND status IN ({', '.join('?' * len(TERMINAL))}) ORDER BY seq",
                tuple(sorted(TERMINAL)),
            ).fetchall()
            return [job for row in rows if (job := self._job(self._db, row)) is not None]

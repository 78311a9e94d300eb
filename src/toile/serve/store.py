"""The durable job queue: one SQLite file in WAL mode with ``synchronous=FULL``.

Why these settings: a job answered with a 2xx must survive ``kill -9`` and power loss. With
``synchronous=FULL`` every commit is fsynced to the WAL before ``commit()`` returns, so a job
is on disk before the client hears "accepted". WAL lets readers (GET routes) run while the worker
writes. Every state change is one short ``BEGIN IMMEDIATE`` transaction, so two writers (or a
second server sharing the file) never interleave a read-then-write.

Live progress is *not* stored here: it changes every step and means nothing after a restart
(see ``events``). Status, attempts, errors, result images and texts are.

The SQL itself (claims, leases, fairness) is shared with PostgreSQL in ``sqlqueue``; this
module holds the connection, the pragmas and the schema. One process uses the file (the server
locks its data folder), so a lease here only ever belongs to the server's own worker thread.

States (:class:`~toile.serve.spec.JobStatus`): ``queued -> running -> succeeded | failed |
cancelled``; ``queued -> cancelled``. A job found ``running`` at start-up was interrupted by a
crash: it goes back to ``queued``, or to ``failed`` with a reason once it has been started
``max_attempts`` times (a job that kills the server every time must not loop forever).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toile.serve.rows import (
    ClientQueueFullError,
    IdempotencyConflict,
    ImageRow,
    JobRow,
    QueueFullError,
    StoreDamagedError,
    TextRow,
)
from toile.serve.sqlqueue import SqlQueue

__all__ = [
    "ClientQueueFullError", "IdempotencyConflict", "ImageRow", "JobRow", "JobStore",
    "QueueFullError", "StoreDamagedError", "TextRow",
]

# 2: jobs.owner (the client that submitted); 3: texts (caption and answer results), and
# jobs.request holds a JobSpec (schema 2's request JSON reads as one). Still 3 with the columns
# and tables of leases and fairness (jobs.model, worker_id, lease_until, passed_over;
# client_turns, workers): they are additive and have defaults, so a toile from before them
# reads and writes the file as it did (it just ignores leases and turns).
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
CREATE TABLE IF NOT EXISTS client_turns (
    owner TEXT PRIMARY KEY,
    last_turn INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    models TEXT NOT NULL,
    seen_at REAL NOT NULL
);
"""
# Columns added after schema 1, as (name, DDL): ALTER TABLE for a file from before them.
ADDED_COLUMNS = (
    ("owner", "owner TEXT NOT NULL DEFAULT ''"),  # 2
    ("model", "model TEXT NOT NULL DEFAULT ''"),  # leases and fairness (still schema 3)
    ("worker_id", "worker_id TEXT"),
    ("lease_until", "lease_until REAL"),
    ("passed_over", "passed_over INTEGER NOT NULL DEFAULT 0"),
)


class JobStore(SqlQueue):
    """The SQLite :class:`~toile.serve.queue.JobQueue` in ``jobs.sqlite3``. Thread-safe: one
    connection behind a lock (the writes are tiny; a pool would add nothing but another way
    to get locking wrong)."""

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
            self._migrate()
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate(self) -> None:
        """Add the columns a file from an older schema lacks. Jobs from before schema 2 belong
        to no client; jobs from before leases get their model from the stored request."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, ddl in ADDED_COLUMNS:
            if name not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {ddl}")
        if "model" not in columns:
            self._db.execute(
                "UPDATE jobs SET model = COALESCE(json_extract(request, '$.model'), '') "
                "WHERE json_valid(request)"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def pragma(self, name: str) -> Any:
        with self._lock:
            return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    # -- SqlQueue hooks -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: the write lock up front, so a read-then-write never
        interleaves with another writer."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def _now(self, db: Any) -> float:
        return time.time()

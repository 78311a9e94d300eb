"""The job queue in PostgreSQL (psycopg 3): API processes and workers on any number of machines
share it. The SQL is ``sqlqueue``'s (the same as SQLite's); this module adds the connection,
the schema with its version, the database clock and row locks.

Why these choices:

- Claims lock the candidate rows ``FOR UPDATE SKIP LOCKED``: two workers claiming at once take
  different jobs without waiting on each other, and a job is claimed by one worker only.
- Every time in the queue (created, started, lease expiry) is the database server's clock, so
  workers on machines whose clocks disagree still agree on when a lease runs out.
- One connection per queue object behind a lock, reconnected when the server went away (a
  restart of PostgreSQL costs the requests in flight, not the process).
- The schema is created and migrated by toile under an advisory lock (several processes may
  start at once), its version in ``toile_schema``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from toile.serve.rows import StoreDamagedError
from toile.serve.sqlqueue import SqlQueue

SCHEMA_VERSION = 1
MIGRATION_LOCK = 0x746F696C65  # pg_advisory_xact_lock key: "toile"
CONNECT_TIMEOUT_S = 10

# version -> the statements that bring the schema from the version before to it
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE jobs (
            seq BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            idempotency_key TEXT UNIQUE,
            body_hash TEXT NOT NULL,
            status TEXT NOT NULL,
            request TEXT NOT NULL,
            webhook TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            attempts INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            error_field TEXT,
            webhook_status TEXT,
            owner TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            worker_id TEXT,
            lease_until DOUBLE PRECISION,
            passed_over INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX jobs_by_status ON jobs (status, seq)",
        "CREATE INDEX jobs_by_owner ON jobs (status, owner, seq)",
        """CREATE TABLE images (
            id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs (id),
            idx INTEGER NOT NULL,
            file TEXT NOT NULL,
            record TEXT NOT NULL
        )""",
        "CREATE INDEX images_by_job ON images (job_id, idx)",
        """CREATE TABLE texts (
            job_id TEXT NOT NULL REFERENCES jobs (id),
            idx INTEGER NOT NULL,
            text TEXT NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (job_id, idx)
        )""",
        "CREATE TABLE client_turns (owner TEXT PRIMARY KEY, last_turn BIGINT NOT NULL DEFAULT 0)",
        """CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            models TEXT NOT NULL,
            seen_at DOUBLE PRECISION NOT NULL
        )""",
        # Live events (progress, previews, state changes) for API processes: NOTIFY carries
        # only "origin id job kind"; the data is read from here (see events_pg).
        """CREATE TABLE job_events (
            id BIGSERIAL PRIMARY KEY,
            job_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX job_events_by_time ON job_events (created_at)",
    ),
}


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).split(":", 1)[0] in ("postgresql", "postgres")


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str) -> Any:
    """An autocommit connection whose rows are dicts (the shared SQL reads columns by name)."""
    import psycopg
    from psycopg.rows import dict_row

    try:
        return psycopg.connect(url, autocommit=True, row_factory=dict_row,
                               connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        raise StoreDamagedError(f"cannot reach the queue at {redact(url)}: {exc}") from None


def migrate(db: Any) -> int:
    """Create or upgrade the schema; returns the version found before. Under an advisory lock,
    so processes starting together migrate once."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS toile_schema (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM toile_schema").fetchone()
        found = row["version"] if row else 0
        if found > SCHEMA_VERSION:
            raise StoreDamagedError(
                f"the queue's schema is version {found}, newer than this toile's "
                f"({SCHEMA_VERSION}): upgrade toile on this machine"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
        if row is None:
            db.execute("INSERT INTO toile_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        else:
            db.execute("UPDATE toile_schema SET version = %s", (SCHEMA_VERSION,))
    return found


class PgQueue(SqlQueue):
    """The PostgreSQL :class:`~toile.serve.queue.JobQueue`."""

    placeholder = "%s"
    lock_rows = " FOR UPDATE SKIP LOCKED"
    stopped_reason = "its worker stopped while running this job"

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._db = connect(url)
        migrate(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _connection(self) -> Any:
        """The connection, opened again if the server closed it (restart, network)."""
        if self._db.closed or self._db.broken:
            self._db.close()
            self._db = connect(self.url)
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            db = self._connection()
            with db.transaction():
                yield db

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any]:
        with self._lock:
            yield self._connection()

    def _now(self, db: Any) -> float:
        return float(db.execute(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now").fetchone()["now"])

    def _unique_violation(self, exc: BaseException) -> bool:
        import psycopg

        return isinstance(exc, psycopg.errors.UniqueViolation)

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Only jobs whose lease expired: the other running jobs' workers are alive, elsewhere."""
        requeued, failed, _ = self._recover_running(max_attempts, expired_only=True)
        return requeued, failed

    def schema_version(self) -> int:
        with self._reading() as db:
            return int(db.execute("SELECT version FROM toile_schema").fetchone()["version"])

"""Which job queue, event bus and blob store a server process uses, and the housekeeping that
goes with them.

- Embedded (``queue`` unset, ``toile serve``): SQLite in the data folder, events in memory, the
  folder's ``uploads/`` and ``images/``. The process locks the folder, so it alone recovers the
  jobs a crash interrupted and sweeps half-written files at start-up.
- Shared (``queue = "postgresql://..."``): the queue and events in PostgreSQL, the data folder a
  shared mount. Any number of API processes (``toile serve --queue``, role ``api``) and workers
  (``toile worker``, role ``worker``) use it at once, so nobody locks the folder or sweeps it,
  and jobs of a dead worker come back through lease expiry, not a start-up recovery.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toile.errors import ToileError
from toile.serve.blobs import LocalBlobStore
from toile.serve.events import EventBus, EventHub
from toile.serve.queue import JobQueue
from toile.serve.store import JobStore

log = logging.getLogger("toile.serve")


class Role(enum.StrEnum):
    """What a process does: everything (embedded), HTTP only, or jobs only."""

    ALL = "all"
    API = "api"
    WORKER = "worker"


class DataDirInUseError(ToileError):
    """Another server process holds the data folder (two would both "recover" its jobs)."""


@dataclass
class Backend:
    store: JobQueue
    hub: EventBus
    blobs: LocalBlobStore
    lock: Any = None  # the data folder's lock (embedded only), released on close

    def close(self) -> None:
        for part in (self.hub, self.store):
            with contextlib.suppress(Exception):
                part.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def lock_data_dir(data_dir: Path) -> Any:
    """An exclusive lock on ``server.lock``, released by the OS when the process dies (so a
    ``kill -9`` never leaves a stale lock)."""
    handle = open(data_dir / "server.lock", "a+")  # noqa: SIM115 - held for the server's life
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, one server per folder is then the user's duty
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataDirInUseError(
            f"another toile server is using {data_dir}; stop it or choose another data_dir"
        ) from None
    return handle


def open_backend(config: Any, role: Role) -> Backend:
    """The queue, events and blobs for ``config`` (a ServeConfig) in ``role``."""
    # The data holds every client's prompts and images: folders 0700, files 0600 (the
    # files' writers set it: write_durably, the worker's PNGs, JobStore).
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # a shared mount may belong to another user
        config.data_dir.chmod(0o700)
    blobs = LocalBlobStore(config.uploads_dir, config.images_dir).create()
    if config.distributed:
        return _open_shared(config, blobs)
    if role is not Role.ALL:
        raise ToileError(f"a separate {role.value} process needs a shared queue: "
                         "--queue postgresql://user@host/database")
    return _open_embedded(config, blobs)


def _open_embedded(config: Any, blobs: LocalBlobStore) -> Backend:
    lock = lock_data_dir(config.data_dir)
    try:
        store = JobStore(config.db_path)
        blobs.sweep()
        remove_leftovers(config, store, blobs)
        requeued, failed = store.recover(config.max_attempts)
    except BaseException:
        lock.close()
        raise
    if requeued or failed:
        log.warning(
            "recovered after an unclean stop: %d job(s) re-queued, %d failed after %d attempts",
            len(requeued), len(failed), config.max_attempts,
        )
    return Backend(store, EventHub(), blobs, lock)


def _open_shared(config: Any, blobs: LocalBlobStore) -> Backend:
    try:
        from toile.serve.events_pg import PgEventBus
        from toile.serve.queue_pg import PgQueue
    except ModuleNotFoundError as exc:
        raise ToileError(f"a PostgreSQL queue needs psycopg ({exc.name} is missing): "
                         'pip install "toile[serve]"') from None
    store = PgQueue(config.queue)
    try:
        hub = PgEventBus(config.queue)
    except BaseException:
        store.close()
        raise
    return Backend(store, hub, blobs)


def expire(config: Any, store: JobQueue, blobs: LocalBlobStore) -> int:
    """Remove the jobs that ended more than ``retention_days`` ago, with their result images;
    returns how many."""
    if not config.retention_days:
        return 0
    gone = store.delete_ended_before(time.time() - config.retention_days * 86400)
    for job in gone:
        for image in job.images:
            blobs.remove_image(image.file)
        blobs.remove_uploads(job.id)
    return len(gone)


def remove_leftovers(config: Any, store: JobQueue, blobs: LocalBlobStore) -> None:
    """At start-up (embedded only): uploads of jobs that ended (or are gone) and jobs past
    their retention."""
    for name in blobs.upload_names():
        job = store.get(name.partition("-")[0])
        if job is None or job.terminal:
            blobs.remove_upload(name)
    removed = expire(config, store, blobs)
    if removed:
        log.info("removed %d job(s) older than %g days", removed, config.retention_days)

"""The worker: one thread that takes queued jobs from the store and runs them through one Engine.

One thread, one engine, one job at a time: the engine already runs one request at a time (its
lock) and batches a request's images itself, so more threads would only queue on that lock.
Jobs are not merged across requests (see README "Serve": batching).

Leases: the worker holds each job it claims for ``lease_s`` seconds and a second thread renews
the lease (``heartbeat``) while the job runs, reads the job's ``cancel_requested`` flag, re-queues
the jobs of workers that stopped renewing (``expire_leases``) and, with several processes, says
the worker is alive (``touch_worker``). A worker that finds its lease lost (it stalled past the
lease, the job went to another worker) stops the job and keeps nothing: ``finish`` is
conditional on still holding the lease.

Every job ends in exactly one terminal state. Any exception from a job fails that job with a
reason and the loop carries on; out-of-memory gets its own message and the CUDA cache is
emptied so the next job has room. Result PNGs are written and fsynced before the job row says
``succeeded``.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from toile.errors import CancelledError, RequestError, ToileError
from toile.serve.blobs import BlobStore, LocalBlobStore
from toile.serve.events import EventBus
from toile.serve.loras import ServerLoras
from toile.serve.queue import JobQueue
from toile.serve.rows import ImageRow, JobRow, TextRow
from toile.serve.spec import JobSpec, JobStatus
from toile.serve.uploads import fsync_dir, fsync_file, load_saved

if TYPE_CHECKING:
    from PIL import Image

    from toile.engine.loaded import ModelInfo
    from toile.progress import ProgressEvent
    from toile.serve.config import ServeConfig

log = logging.getLogger("toile.serve")
IDLE_WAIT_S = 0.5  # how long the loop sleeps when the queue is empty and nobody wakes it
MAX_BEAT_S = 5.0  # the longest wait between heartbeats, whatever the lease


def default_worker_id(device: str | None) -> str:
    """Unique per process, and readable in the ``workers`` table: host, pid, device."""
    return f"{socket.gethostname()}:{os.getpid()}:{device or 'auto'}:{uuid.uuid4().hex[:6]}"


def heartbeat_interval(lease_s: float) -> float:
    """Three heartbeats per lease: one late or lost beat does not lose the job."""
    return max(0.05, min(lease_s / 3, MAX_BEAT_S))


def encode_preview(image: Image.Image, size: int) -> str:
    """A small PNG, base64: previews are for watching, not for keeping."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def failure_reason(exc: BaseException) -> tuple[str, str | None]:
    """A user-facing reason (and field, for request errors) for a failed job."""
    if isinstance(exc, RequestError):
        return str(exc), exc.field
    if isinstance(exc, ToileError):
        return str(exc), None
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError" or "out of memory" in str(exc):
        return (
            f"out of memory while generating ({name}: {exc}); try a smaller size or fewer images",
            None,
        )
    if isinstance(exc, FloatingPointError) or "nan" in str(exc).lower().split():
        return f"numerical failure (NaN/inf) while generating ({name}: {exc})", None
    return f"generation failed: {name}: {exc}", None


def _empty_device_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


class Worker:
    """Runs queued jobs. ``ended(job)`` is called once per job that reaches a terminal state."""

    def __init__(
        self,
        config: ServeConfig,
        store: JobQueue,
        hub: EventBus,
        engine: Any,
        ended: Callable[[JobRow], None],
        loras: ServerLoras | None = None,
        blobs: BlobStore | None = None,
        worker_id: str | None = None,
        announce: bool = False,
    ) -> None:
        self.config = config
        self.loras = loras if loras is not None else ServerLoras(config.loras)
        self.store = store
        self.hub = hub
        self.engine = engine
        self.ended = ended
        self.blobs = blobs or LocalBlobStore(config.uploads_dir, config.images_dir)
        self.worker_id = worker_id or default_worker_id(config.device)
        self.announce = announce  # touch_worker: other processes' /health counts this worker
        self._recent_models: list[str] = []  # last run last: what the engine likely holds
        self._lost: set[str] = set()  # running jobs whose lease this worker lost
        # model id -> what the loaded model declares, learnt from runs, so submit can check a
        # request's mode and size the way the run will
        self.known_models: dict[str, ModelInfo] = {}
        self.credentials: Any = None  # C2PA signing config for result PNGs (None: unsigned)
        self._preloaded: dict[str, dict[str, Any]] = {}  # job id -> images decoded at submit
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}
        self._pending_cancels: set[str] = set()
        self._user_cancelled: set[str] = set()
        self._thread: threading.Thread | None = None
        self._beat_thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="toile-worker", daemon=True)
        self._beat_thread = threading.Thread(target=self._beat_loop, name="toile-heartbeat",
                                             daemon=True)
        self._thread.start()
        self._beat_thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def preload(self, job_id: str, images: dict[str, Any]) -> None:
        """Images decoded at submit, used when the job runs (bounded by the queue's size)."""
        if images:
            with self._lock:
                self._preloaded[job_id] = images

    def drop_preloaded(self, job_id: str) -> None:
        """A job that ended without running (cancelled while queued) needs its images no more."""
        with self._lock:
            self._preloaded.pop(job_id, None)

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after interrupting the running job, which goes back to the queue (it was not
        the client's choice to stop it)."""
        self._stop.set()
        with self._lock:
            for event in self._running.values():
                event.set()
        self._wake.set()
        for thread in (self._thread, self._beat_thread):
            if thread is not None:
                thread.join(timeout)

    def cancel(self, job_id: str) -> None:
        """Stop a running job at its next denoising step (or as soon as it is claimed)."""
        with self._lock:
            self._user_cancelled.add(job_id)
            event = self._running.get(job_id)
            if event is not None:
                event.set()
            else:
                self._pending_cancels.add(job_id)

    def cancel_if_running(self, job_id: str) -> bool:
        """Stop the job if this worker runs it (with several workers, each hears every
        cancel: the others must not remember it)."""
        with self._lock:
            if job_id not in self._running:
                return False
        self.cancel(job_id)
        return True

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def held_models(self) -> list[str]:
        """The models this worker ran last (its engine's cache): its claims prefer them."""
        with self._lock:
            return list(self._recent_models)

    def _lose(self, job_id: str) -> None:
        """The lease is gone (the job is queued again, or running elsewhere): stop it here."""
        with self._lock:
            event = self._running.get(job_id)
            if event is None:  # it ended between the heartbeat's list and now
                return
            self._lost.add(job_id)
            event.set()
        log.warning("job %s: lease lost (this worker stalled past lease_s); stopping it here",
                    job_id)

    # -- heartbeats ---------------------------------------------------------------------------

    def _beat_loop(self) -> None:
        interval = heartbeat_interval(self.config.lease_s)
        while not self._stop.wait(interval):
            try:
                self._beat()
            except Exception:  # the database is away: the next beat tries again
                log.warning("heartbeat failed; retrying", exc_info=True)

    def _beat(self) -> None:
        for job_id in self.running_ids():
            beat = self.store.heartbeat(job_id, self.worker_id, self.config.lease_s)
            if not beat.held:
                self._lose(job_id)
            elif beat.cancel_requested:
                self.cancel_if_running(job_id)
        for row in self.store.expire_leases(self.config.max_attempts):
            self.ended(row)
        if self.announce:
            self.store.touch_worker(self.worker_id, str(getattr(self.engine, "device", "")),
                                    self.held_models())

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim_next(self.worker_id, self.config.lease_s,
                                            self.held_models())
            except Exception:
                log.exception("could not read the queue; retrying")
                self._stop.wait(1.0)
                continue
            if job is None:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception:  # a bug here must not kill the worker
                log.exception("job %s: unexpected error in the worker", job.id)

    def _run(self, job: JobRow) -> None:
        cancel = threading.Event()
        with self._lock:
            self._running[job.id] = cancel
            if job.cancel_requested or job.id in self._pending_cancels:
                self._user_cancelled.add(job.id)
                cancel.set()
            self._pending_cancels.discard(job.id)
        self.hub.publish(job.id, "started",
                         {"status": JobStatus.RUNNING, "attempt": job.attempts})
        status, error, field = JobStatus.SUCCEEDED, None, None
        images: list[ImageRow] = []
        texts: list[TextRow] = []
        try:
            if cancel.is_set():  # cancelled between the claim and now: do not start at all
                raise CancelledError("cancelled before it started")
            if job.spec is None:
                raise ToileError(f"job {job.id} cannot run: {job.damaged}; submit it again")
            request = job.spec.request(self._inputs(job.id, job.spec), self.loras.path)
            self._learn(job.spec.model)
            result = self.engine.run(
                request,
                progress=lambda event: self._progress(job.id, event),
                cancel=cancel,
                preview_every=self.config.preview_every,
            )
            if result.texts:  # caption, answer: one record per text, no image
                texts = [TextRow(job.id, index, text, record.to_dict()) for index, (text, record)
                         in enumerate(zip(result.texts, result.records, strict=True))]
            else:
                images = self._save_images(job, result)
        except CancelledError:
            with self._lock:
                by_user = job.id in self._user_cancelled
                lost = job.id in self._lost
            if lost:  # not this worker's job any more: nothing to record
                self._forget(job.id)
                return
            if not by_user and self._stop.is_set():
                # shutting down: run it again after the restart (or on another worker)
                self.store.requeue(job.id, self.worker_id)
                self._forget(job.id)
                return
            status = JobStatus.CANCELLED
        except Exception as exc:  # MemoryError included: it subclasses Exception
            status = JobStatus.FAILED
            error, field = failure_reason(exc)
            if "out of memory" in error:
                _empty_device_cache()
            log.warning(
                "job %s failed: %s", job.id, error, exc_info=not isinstance(exc, ToileError)
            )
        try:
            final = self.store.finish(job.id, status, error=error, error_field=field,
                                      images=images, texts=texts, worker_id=self.worker_id)
        finally:
            self._forget(job.id)  # if the store failed, the row stays running: a restart re-queues
        if final is None:  # the lease was lost meanwhile: another attempt owns the job now
            for image in images:
                self.blobs.remove_image(image.file)
            return
        self.ended(final)

    def _inputs(self, job_id: str, spec: JobSpec) -> dict[str, Image.Image]:
        """The job's input images: those decoded at submit (kept in memory), else its saved
        upload files (after a restart)."""
        with self._lock:
            preloaded = self._preloaded.pop(job_id, None) or {}
        return {
            name: preloaded[name] if name in preloaded
            else load_saved(self.blobs.upload_path(file_name), field=name)
            for name, file_name in spec.uploads().items()
        }

    def _ingredient(self, job: JobRow) -> tuple[bytes, str] | None:
        """The job's input image as uploaded (bytes, MIME type): an edit's C2PA ingredient."""
        name = job.spec.image if job.spec is not None else None
        if name is None:
            return None
        suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        fmt = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}.get(
            suffix, "image/png")
        data = self.blobs.upload_bytes(name)  # a plain file name: JobSpec checked it
        return (data, fmt) if data is not None else None

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)
            self._user_cancelled.discard(job_id)
            self._lost.discard(job_id)

    def _learn(self, model: str) -> None:
        """Load the model (the run needs it anyway) and keep what it declares for submit."""
        if model not in self.known_models:
            self.known_models[model] = self.engine.model_info(model)
        keep = max(1, int(getattr(self.engine, "cache_size", 1) or 1))
        with self._lock:
            if model in self._recent_models:
                self._recent_models.remove(model)
            self._recent_models = [*self._recent_models, model][-keep:]

    def _progress(self, job_id: str, event: ProgressEvent) -> None:
        data: dict[str, Any] = {"step": event.step, "total": event.total, "stage": event.stage}
        if event.preview is not None:
            try:
                data["preview_png"] = encode_preview(event.preview, self.config.preview_size)
            except Exception:  # a preview is a nicety; never fail a job over it
                log.debug("preview encoding failed", exc_info=True)
        self.hub.publish(job_id, "progress", data)

    def _save_images(self, job: JobRow, result: Any) -> list[ImageRow]:
        """Write each PNG (with its record) and fsync it and the folder before the caller
        commits the job as succeeded: the row must never name a file that is not on disk."""
        from toile.io.metadata import save_png
        from toile.safety.provenance import finisher

        ingredient = self._ingredient(job) if self.credentials is not None else None
        finish = finisher(self.credentials, ingredient)  # label, or sign with C2PA
        rows = []
        folders = set()
        for index, (image, record) in enumerate(zip(result.images, result.records, strict=True)):
            image_id = uuid.uuid4().hex
            name = f"{image_id}.png"
            path = self.blobs.image_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            folders.add(path.parent)
            save_png(image, record, str(path), finish=lambda data, r=record: finish(data, r))
            path.chmod(0o600)  # a client's result, for the server's user only
            fsync_file(path)
            rows.append(ImageRow(image_id, job.id, index, name, record.to_dict()))
        for folder in folders:
            fsync_dir(folder)
        return rows

"""The worker: one thread that takes queued jobs from the store and runs them through one Engine.

One thread, one engine, one job at a time: the engine already runs one request at a time (its
lock) and batches a request's images itself, so more threads would only queue on that lock.
Jobs are not merged across requests (see README "Serve": batching).

Every job ends in exactly one terminal state. Any exception from a job fails that job with a
reason and the loop carries on; out-of-memory gets its own message and the CUDA cache is
emptied so the next job has room. Result PNGs are written and fsynced before the job row says
``succeeded``.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.errors import CancelledError, RequestError, ToileError
from toile.serve.events import EventHub
from toile.serve.loras import ServerLoras
from toile.serve.store import CANCELLED, FAILED, SUCCEEDED, ImageRow, JobRow, JobStore
from toile.serve.uploads import fsync_dir, fsync_file, load_saved

if TYPE_CHECKING:
    from PIL import Image

    from toile.progress import ProgressEvent
    from toile.request import GenerationRequest
    from toile.serve.config import ServeConfig

log = logging.getLogger("toile.serve")
IDLE_WAIT_S = 0.5  # how long the loop sleeps when the queue is empty and nobody wakes it


def stored_to_request(
    stored: dict[str, Any], config: ServeConfig, loras: ServerLoras,
    preloaded: dict[str, Any] | None = None,
) -> GenerationRequest:
    """Rebuild the GenerationRequest from the JSON the store holds (uploads from ``preloaded``
    images decoded at submit, else from their files; LoRA ids looked up again). Raises
    RequestError naming the field if that is no longer possible."""
    from toile.request import GenerationRequest, LoraSpec, Outpaint

    fields = dict(stored)
    for name in ("image", "mask"):
        file_name = fields.get(name)
        if file_name is not None and preloaded and name in preloaded:
            fields[name] = preloaded[name]
        elif file_name is not None:
            if Path(file_name).name != file_name:  # never a path, only names the server made
                raise RequestError(name, "stored upload name is invalid")
            fields[name] = load_saved(config.uploads_dir / file_name, field=name)
    if fields.get("outpaint") is not None:
        fields["outpaint"] = Outpaint(**fields["outpaint"])
    specs = []
    for index, lora in enumerate(fields.get("loras") or ()):
        path = loras.path(lora["id"], f"loras[{index}].id")
        specs.append(LoraSpec(str(path), float(lora["scale"])))
    fields["loras"] = tuple(specs)
    return GenerationRequest(**fields)


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
        store: JobStore,
        hub: EventHub,
        engine: Any,
        ended: Callable[[JobRow], None],
        loras: ServerLoras | None = None,
    ) -> None:
        self.config = config
        self.loras = loras if loras is not None else ServerLoras(config.loras)
        self.store = store
        self.hub = hub
        self.engine = engine
        self.ended = ended
        # model id -> (FamilyDefaults, family name), learnt from loads, so submit can check sizes
        # model id -> resolve()'s arguments after the request (defaults, family, samplers)
        self.known_defaults: dict[str, tuple[Any, str, Any]] = {}
        self.credentials: Any = None  # C2PA signing config for result PNGs (None: unsigned)
        self._preloaded: dict[str, dict[str, Any]] = {}  # job id -> images decoded at submit
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}
        self._pending_cancels: set[str] = set()
        self._user_cancelled: set[str] = set()
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="toile-worker", daemon=True)
        self._thread.start()

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
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel(self, job_id: str) -> None:
        """Stop a running job at its next denoising step (or as soon as it is claimed)."""
        with self._lock:
            self._user_cancelled.add(job_id)
            event = self._running.get(job_id)
            if event is not None:
                event.set()
            else:
                self._pending_cancels.add(job_id)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim_next()
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
        self.hub.publish(job.id, "started", {"status": "running", "attempt": job.attempts})
        status, error, field, images = SUCCEEDED, None, None, []
        try:
            if cancel.is_set():  # cancelled between the claim and now: do not start at all
                raise CancelledError("cancelled before it started")
            if job.damaged is not None:
                raise ToileError(f"job {job.id} cannot run: {job.damaged}; submit it again")
            with self._lock:
                preloaded = self._preloaded.pop(job.id, None)
            request = stored_to_request(job.request, self.config, self.loras, preloaded)
            self._learn_defaults(request.model)
            result = self.engine.run(
                request,
                progress=lambda event: self._progress(job.id, event),
                cancel=cancel,
                preview_every=self.config.preview_every,
            )
            images = self._save_images(job, result)
        except CancelledError:
            with self._lock:
                by_user = job.id in self._user_cancelled
            if not by_user and self._stop.is_set():
                self.store.requeue(job.id)  # shutting down: run it again after the restart
                self._forget(job.id)
                return
            status = CANCELLED
        except Exception as exc:  # MemoryError included: it subclasses Exception
            status = FAILED
            error, field = failure_reason(exc)
            if "out of memory" in error:
                _empty_device_cache()
            log.warning(
                "job %s failed: %s", job.id, error, exc_info=not isinstance(exc, ToileError)
            )
        try:
            final = self.store.finish(job.id, status, error=error, error_field=field, images=images)
        finally:
            self._forget(job.id)  # if the store failed, the row stays running: a restart re-queues
        if final is not None:
            self.ended(final)

    def _ingredient(self, job: JobRow) -> tuple[bytes, str] | None:
        """The job's input image as uploaded (bytes, MIME type): an edit's C2PA ingredient."""
        name = job.request.get("image")
        if not isinstance(name, str) or Path(name).name != name:
            return None
        path = self.config.uploads_dir / name
        suffix = path.suffix.lower().lstrip(".")
        fmt = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}.get(
            suffix, "image/png")
        return (path.read_bytes(), fmt) if path.is_file() else None

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)
            self._user_cancelled.discard(job_id)

    def _learn_defaults(self, model: str | None) -> None:
        load = getattr(self.engine, "load", None)
        if load is None or model is None or model in self.known_defaults:
            return
        cached = load(model)
        self.known_defaults[model] = (
            cached.loaded.defaults, cached.family.name, cached.loaded.samplers
        )

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

        folder = self.config.images_dir
        folder.mkdir(parents=True, exist_ok=True)
        ingredient = self._ingredient(job) if self.credentials is not None else None
        finish = finisher(self.credentials, ingredient)  # label, or sign with C2PA
        rows = []
        for index, (image, record) in enumerate(zip(result.images, result.records, strict=True)):
            image_id = uuid.uuid4().hex
            name = f"{image_id}.png"
            save_png(image, record, str(folder / name),
                     finish=lambda data, r=record: finish(data, r))
            (folder / name).chmod(0o600)  # a client's result, for the server's user only
            fsync_file(folder / name)
            rows.append(ImageRow(image_id, job.id, index, name, record.to_dict()))
        fsync_dir(folder)
        return rows

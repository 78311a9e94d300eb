"""``JobService``: the job layer. Every route (native, and any compatibility API built later)
goes through these methods and nothing else touches the store, the worker or the hub.

- ``submit(body, idempotency_key)`` -> ``(Job, created)``: validate fully (a 2xx means the job
  can be stored and run), save uploads, commit durably, wake the worker.
- ``get(id)``, ``list(statuses, limit)``, ``cancel(id)``: the job as :class:`schemas.Job`.
- ``events(id)``: an async iterator of :class:`events.JobEvent`, current state first.
- ``image(id)``: the PNG's path inside the images folder, and its record.
- ``health()``, ``status_events()`` (``health()`` again whenever a job changes state),
  ``models()``.

Validation errors are :class:`~toile.errors.RequestError` with ``field`` set; the app turns
them into 422 responses naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.errors import ModelNotFoundError, RequestError, ToileError
from toile.request import Outpaint, Task, parse_enum
from toile.serve import schemas
from toile.serve.backends import Backend, DataDirInUseError, Role, expire, open_backend
from toile.serve.blobs import BlobStore, LocalBlobStore
from toile.serve.events import EventBus, JobEvent
from toile.serve.loras import ServerLoras
from toile.serve.queue import JobQueue
from toile.serve.rows import IdempotencyConflict, JobRow
from toile.serve.spec import JobSpec, JobStatus, LoraRef, passed_fields, upload_name
from toile.serve.uploads import Upload, read_upload, write_durably

if TYPE_CHECKING:
    from toile.engine.models import ModelEntry, ModelRegistry
    from toile.samplers import SamplerMenu
    from toile.serve.config import ServeConfig
    from toile.serve.webhooks import WebhookSender
    from toile.serve.worker import Worker

log = logging.getLogger("toile.serve")
ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
TERMINAL_EVENT = {
    JobStatus.SUCCEEDED: "finished", JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}
MAX_LIST = 500
WORKER_SEEN_S = 15.0  # a worker heard from within this long counts as alive (/health)
__all__ = ["DataDirInUseError", "JobNotFoundError", "JobService", "Role"]


class JobNotFoundError(ToileError, LookupError):
    """No job (or image) with that id."""


class JobService:
    """The internal API over the durable queue; see the module docstring."""

    def __init__(
        self,
        config: ServeConfig,
        store: JobQueue,
        hub: EventBus,
        registry: ModelRegistry,
        webhooks: WebhookSender,
        blobs: BlobStore | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.hub = hub
        self.blobs = blobs or LocalBlobStore(config.uploads_dir, config.images_dir)
        self.registry = registry
        self.webhooks = webhooks
        self.loras = ServerLoras(config.loras)
        self.worker: Worker | None = None
        # The worker's engine: the service asks it which model serves a task (never to run)
        self.engine: Any = None
        self.policy: Any = None  # toile.safety.policy.Policy, set by open()
        self._audit_lock = threading.Lock()
        self._backend: Backend | None = None

    @classmethod
    def open(cls, config: ServeConfig, *, engine: Any = None,
             role: Role | str = Role.ALL) -> JobService:
        """Open the queue, events and blobs (``backends``: SQLite, or PostgreSQL with
        ``config.queue``) and, unless ``role`` is ``api``, start the worker. ``engine``
        defaults to an id-only Engine on the configured device (an API process only asks it
        about models, so it never needs the GPU)."""
        from toile.serve.webhooks import WebhookSender

        role = Role(role)
        backend = open_backend(config, role)
        try:
            policy = config.build_policy()
            if engine is None:
                engine = _build_engine(config, policy, runs_jobs=role is not Role.API)
            if getattr(engine, "allow_paths", False):
                raise ValueError("the server's engine must be built with allow_paths=False")
            webhooks = WebhookSender(
                config.webhook_timeout_s, backend.store.set_webhook_status, config.webhook_allow
            )
            service = cls(config, backend.store, backend.hub, engine.registry, webhooks,
                          backend.blobs)
            service.policy = policy
            service.engine = engine
            service._backend = backend
            if role is not Role.API:
                service._start_worker(engine)
        except BaseException:
            backend.close()
            raise
        return service

    def _start_worker(self, engine: Any) -> None:
        """The worker thread; with a shared queue it also listens for cancels of its jobs
        and says it is alive. Webhooks a stop left unsent go out first."""
        from toile.serve.worker import Worker

        worker = Worker(self.config, self.store, self.hub, engine, ended=self._job_ended,
                        loras=self.loras, blobs=self.blobs, announce=self.config.distributed)
        worker.credentials = self.config.build_credentials()
        self.worker = worker
        if self.config.distributed:
            self.hub.on_cancel(worker.cancel_if_running)
        for job in self.store.pending_webhooks():
            if job.webhook is not None:
                self.webhooks.send(job.webhook, job.id, self.view(job).model_dump(mode="json"))
        worker.start()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.webhooks.close(wait=True)
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        else:
            self.store.close()

    # -- submit -------------------------------------------------------------------------------

    def submit(
        self,
        body: schemas.JobCreate,
        idempotency_key: str | None = None,
        client: str = "",
        owner: str = "",
        decoded: Mapping[str, Upload] | None = None,
    ) -> tuple[schemas.Job, bool]:
        """Validate and enqueue. With an Idempotency-Key seen before (and the same body) the
        earlier job comes back with ``created=False``. ``client`` (the peer's address) goes
        into the policy's audit log; ``owner`` is the configured client that submits (its
        keys and jobs are its own). ``decoded``: the image/mask a route already decoded and
        checked (an upload is decoded once per request, and compatibility routes hand over
        bytes, not base64), instead of base64 in ``body``."""
        if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
            raise RequestError("Idempotency-Key", "must be 1-255 visible ASCII characters")
        if idempotency_key is not None and owner:
            idempotency_key = f"{owner}\x00{idempotency_key}"  # one client's keys are its own
        body_hash = hashlib.sha256(
            json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest()
        if idempotency_key is not None:
            existing = self.store.get_by_key(idempotency_key)
            if existing is not None:
                if existing.body_hash != body_hash:
                    raise RequestError(
                        "Idempotency-Key",
                        f"was already used for job {existing.id} with a different request body",
                    )
                return self.view(existing), False
        job_id = uuid.uuid4().hex
        self._check_policy(body.prompt, owner or client, job_id)
        if body.question is not None:
            self._check_policy(body.question, owner or client, job_id, "question")
        spec, uploads = self._validate(job_id, body, decoded or {})
        row, created = self._insert(job_id, spec, uploads, body, body_hash, idempotency_key,
                                    owner)
        if not created:
            return self.view(row), False
        self.hub.publish(
            job_id, "queued",
            {"status": JobStatus.QUEUED, "position": self.store.queue_position(row)},
        )
        if self.worker is not None:
            # The images decoded at submit go to the worker in memory (an upload is decoded
            # once); after a restart it reads the saved files instead.
            self.worker.preload(job_id, {name: upload.image for name, upload in uploads.items()})
            self.worker.wake()
        return self.view(row), True

    def _insert(
        self,
        job_id: str,
        spec: JobSpec,
        uploads: Mapping[str, Upload],
        body: schemas.JobCreate,
        body_hash: str,
        idempotency_key: str | None,
        owner: str,
    ) -> tuple[JobRow, bool]:
        """Write the uploads durably, then commit the job row naming them (the commit point);
        on any failure, or when an earlier job had the same key, the files go again."""
        saved: list[str] = []
        files = spec.uploads()
        try:
            for name, upload in uploads.items():
                write_durably(self.blobs.upload_path(files[name]), upload.data)
                saved.append(files[name])
            try:
                row, created = self.store.insert(
                    job_id, spec, body_hash=body_hash,
                    idempotency_key=idempotency_key, webhook=body.webhook,
                    max_queue=self.config.max_queue, owner=owner,
                    max_per_client=self.config.max_queued_per_client or None,
                )
            except IdempotencyConflict as exc:
                raise RequestError(
                    "Idempotency-Key",
                    f"was already used for job {exc.job.id} with a different request body",
                ) from None
        except BaseException:
            for name in saved:
                self.blobs.remove_upload(name)
            raise
        if not created:
            for name in saved:
                self.blobs.remove_upload(name)
        return row, created

    def _check_policy(self, prompt: str, client: str, job_id: str, field: str = "prompt") -> None:
        """The prompt policy at submit (on ``field``: the prompt, or an answer's question): a
        blocked text is a 422 naming the rule id (never its terms); refusals and warnings go to
        ``audit.jsonl`` in the data folder (time, client, rule, text SHA-256 — not the text)."""
        from toile.safety.policy import PolicyError, enforce

        try:
            warnings = enforce(self.policy, prompt, field)
        except PolicyError as exc:
            self._audit(client, "refused", (exc.match,), prompt, None)
            raise
        if warnings:
            self._audit(client, "warned", warnings, prompt, job_id)

    def _audit(self, client: str, outcome: str, matches: Sequence[Any], prompt: str,
               job_id: str | None) -> None:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "client": client,
            "outcome": outcome,
            "rules": [{"rule": m.rule, "category": m.category} for m in matches],
            "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
            "job": job_id,
        }
        path = self.config.data_dir / "audit.jsonl"
        with self._audit_lock:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        log.warning("policy %s a prompt from %s: %s", outcome, client or "?",
                    ", ".join(m.rule for m in matches))

    def check_output_size(self, model: str | None, size: tuple[int, int], field: str) -> None:
        """Before a route resizes an input to ``size``: refuse a size over the server's pixel cap
        or the model's own budget (known once the worker has loaded the model), so no work is
        spent on a picture the job would refuse."""
        from toile.resolve import resolve_budget

        width, height = size
        cap = self.config.max_image_pixels
        known = self._known(model or self.registry.default_id)
        if known is not None:
            cap = min(cap, known.defaults.max_pixels)
        resolve_budget(width, height, cap, field)

    def _known(self, model: str) -> Any:
        """The worker's :class:`~toile.engine.engine.ModelInfo` of a model it has loaded."""
        return self.worker.known_models.get(model) if self.worker is not None else None

    def default_model(self, task: Task) -> str:
        """The model a job of ``task`` runs on when it names none (fixed at submit): the
        default model for generate, the engine's choice for the other tasks."""
        if task is Task.GENERATE or self.engine is None:
            return self.registry.default_id
        return self.engine.default_model(task)

    def _default_or_none(self, task: Task) -> str | None:
        try:
            return self.default_model(task)
        except RequestError:  # none serves it, or several and none chosen
            return None

    def models_for(self, task: Task) -> list[str]:
        """Ids of the registered models that serve ``task`` (from configs; nothing loads)."""
        return self.engine.models_for(task) if self.engine is not None else []

    def _validate(
        self, job_id: str, body: schemas.JobCreate, decoded: Mapping[str, Upload]
    ) -> tuple[JobSpec, dict[str, Upload]]:
        """Everything that can be checked before running; returns the spec to store and the
        decoded uploads. Builds the GenerationRequest so its own checks apply."""
        from toile.resolve import resolve

        config = self.config
        if body.steps is not None and body.steps > config.max_steps:
            raise RequestError("steps", f"must be at most {config.max_steps} on this server")
        if body.num_images > config.max_images:
            raise RequestError("num_images", f"must be at most {config.max_images} on this server")
        task = parse_enum(Task, body.task, "task")
        if task is Task.GENERATE and "prompt" not in body.model_fields_set:
            # Only reading tasks and upscales do without one ("" is a prompt: the unconditional)
            raise RequestError("prompt", "is required for the generate task")
        model = body.model if body.model is not None else self.default_model(task)
        entries = self._entries(model, body.refiner)
        self._check_model_options(body, entries)
        if body.webhook is not None:
            from toile.serve.webhooks import allowed_networks, check_webhook_url

            if not config.webhooks:
                raise RequestError("webhook", "webhooks are turned off on this server")
            check_webhook_url(body.webhook, allowed_networks(config.webhook_allow))
        uploads = dict(decoded)
        for name in ("image", "mask"):
            text = getattr(body, name)
            if text is not None and name not in uploads:
                uploads[name] = read_upload(text, field=name, max_bytes=config.max_image_bytes,
                                            max_pixels=config.max_image_pixels)
        spec = _spec(job_id, body, task, model, uploads)
        request = spec.request({name: upload.image for name, upload in uploads.items()},
                               self.loras.path)
        self._check_serves(entries["model"], task)
        known = self._known(model)
        if known is not None:  # the model has been loaded: check mode and size now, not later
            resolve(request, known.defaults, known.family, known.samplers)
        return spec, uploads

    def _entries(self, model: str, refiner: str | None) -> dict[str, ModelEntry]:
        """The registry entries of the job's model and refiner (ids only, never paths)."""
        from toile.engine.models import MODEL_ID

        entries = {}
        for name, value in (("model", model), ("refiner", refiner)):
            if value is None:
                continue
            if not MODEL_ID.match(value):
                raise RequestError(
                    name, "must be a model id from GET /v1/models; paths and URLs are not accepted"
                )
            try:
                entries[name] = self.registry.resolve(value, allow_paths=False)
            except ModelNotFoundError as exc:
                raise RequestError(name, str(exc)) from None
        return entries

    def _check_model_options(
        self, body: schemas.JobCreate, entries: Mapping[str, ModelEntry]
    ) -> None:
        """Refuse a refiner pair or sampler the model cannot use before queueing, from configs
        (nothing is loaded; a single file's sampler menu is known once the worker loaded it)."""
        if body.refiner is not None:
            from toile.engine.engine import check_refiner
            from toile.families.registry import detect_family

            families = {name: detect_family(entry.path) for name, entry in entries.items()}
            check_refiner(families["model"], families["refiner"], body.refiner)
        if body.sampler is not None or body.schedule is not None:
            from toile.families.registry import checkpoint_samplers

            menu = checkpoint_samplers(entries["model"].path)
            if menu is not None:
                menu.choose(body.sampler, body.schedule)
        if body.hires_scale is not None:  # the upscaler: a registered id that upscales
            from toile.resolve import DEFAULT_HIRES_UPSCALER

            upscaler = body.hires_upscaler or DEFAULT_HIRES_UPSCALER
            entry = self._entries(upscaler, None)["model"]
            try:
                self._check_serves(entry, Task.UPSCALE)
            except RequestError as exc:
                raise RequestError("hires_upscaler", exc.message) from None

    def _check_serves(self, entry: ModelEntry, task: Task) -> None:
        """A model that cannot do the task is a 422 naming ``model`` now, not a failed job
        later (from its family's capability table; an unreadable model fails when it runs)."""
        from toile.engine.models import served_tasks

        try:
            tasks = served_tasks(entry.path)
        except (ToileError, OSError):
            return
        if task not in tasks:
            serving = self.models_for(task)
            others = f"models that do: {', '.join(serving)}" if serving else (
                "no model on this server does")
            raise RequestError("model", f"{entry.id!r} does not serve the {task.value} task; "
                               f"{others}")

    # -- reads --------------------------------------------------------------------------------

    def _row(self, job_id: str, owner: str | None = None) -> JobRow:
        """The job; another client's is "not found" (its existence is not told)."""
        row = self.store.get(job_id) if ID_PATTERN.match(job_id) else None
        if row is None or (owner is not None and row.owner != owner):
            raise JobNotFoundError(f"no job with id {job_id!r}")
        return row

    def get(self, job_id: str, owner: str | None = None) -> schemas.Job:
        """``owner`` None: any job (the admin, or a server without clients)."""
        return self.view(self._row(job_id, owner))

    def list(
        self, statuses: Sequence[str] = (), limit: int = 100, owner: str | None = None
    ) -> schemas.JobList:
        """``statuses``: JobStatus values (a query's strings); anything else is a 422."""
        wanted = tuple(parse_enum(JobStatus, status, "status") for status in statuses)
        if not 1 <= limit <= MAX_LIST:
            raise RequestError("limit", f"must be an integer in [1, {MAX_LIST}], got {limit}")
        jobs = [self.view(row) for row in self.store.list(wanted, limit, owner)]
        return schemas.JobList(jobs=jobs, queue_length=self.store.counts()[JobStatus.QUEUED])

    def view(self, row: JobRow) -> schemas.Job:
        progress = self.hub.progress(row.id) if row.status is JobStatus.RUNNING else None
        return schemas.Job(
            id=row.id,
            status=row.status,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            queue_position=self.store.queue_position(row),
            progress=schemas.Progress(**progress) if progress else None,
            attempts=row.attempts,
            images=[
                schemas.ImageOut(id=image.id, url=f"/v1/images/{image.id}", record=image.record)
                for image in row.images
            ],
            texts=[
                schemas.TextOut(index=text.index, text=text.text, record=text.record)
                for text in row.texts
            ],
            error=(
                schemas.ErrorInfo(message=row.error, field=row.error_field) if row.error else None
            ),
            request=row.spec.view() if row.spec is not None else {},
            webhook_status=row.webhook_status,
        )

    def image(self, image_id: str, owner: str | None = None) -> tuple[Path, dict[str, Any]]:
        """The PNG (a file the server named, inside its images folder) and its record."""
        row = self.store.image(image_id) if ID_PATTERN.match(image_id) else None
        if row is not None and owner is not None:
            job = self.store.get(row.job_id)
            row = row if job is not None and job.owner == owner else None
        if row is None:
            raise JobNotFoundError(f"no image with id {image_id!r}")
        path = self.blobs.image_path(row.file)
        if not path.is_file():
            raise JobNotFoundError(f"image {image_id} is no longer on disk")
        return path, row.record

    # -- cancel -------------------------------------------------------------------------------

    def cancel(self, job_id: str, owner: str | None = None) -> schemas.Job:
        """A queued job is cancelled now and never starts; a running one stops within one
        denoising step (the returned status is still ``running`` until it has)."""
        self._row(job_id, owner)  # another client's job is not found
        row, moved = self.store.cancel(job_id)
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        if moved:
            self._job_ended(row)
        elif row.status is JobStatus.RUNNING:
            if self.config.distributed:  # whichever process runs it hears this
                self.hub.send_cancel(job_id)
            elif self.worker is not None:
                self.worker.cancel(job_id)
        return self.view(row)

    # -- events -------------------------------------------------------------------------------

    def _snapshot(self, job_id: str, live: dict[str, JobEvent | None]) -> list[JobEvent]:
        row = self._row(job_id)
        if row.status is JobStatus.QUEUED:
            position = self.store.queue_position(row)
            return [JobEvent("queued", job_id,
                             {"status": JobStatus.QUEUED, "position": position})]
        if row.status is JobStatus.RUNNING:
            started = live["started"] or JobEvent(
                "started", job_id, {"status": JobStatus.RUNNING, "attempt": row.attempts}
            )
            return [started] + ([live["progress"]] if live["progress"] is not None else [])
        data = self.view(row).model_dump(mode="json")
        return [JobEvent(TERMINAL_EVENT[row.status], job_id, data)]

    async def events(
        self, job_id: str, keepalive_s: float | None = None
    ) -> AsyncIterator[JobEvent | None]:
        """The job's events, current state first, ending after the terminal event. Yields
        None after ``keepalive_s`` idle seconds, so a caller can ping or notice a hang-up."""
        self._row(job_id)
        loop = asyncio.get_running_loop()
        subscription = self.hub.subscribe(job_id, loop, lambda live: self._snapshot(job_id, live))
        try:
            while True:
                event = await subscription.get(keepalive_s)
                yield event
                if event is not None and event.terminal:
                    return
        finally:
            with contextlib.suppress(Exception):
                subscription.close()

    def _job_ended(self, row: JobRow) -> None:
        """Called once per job when it reaches a terminal state (worker thread or cancel): its
        uploads are deleted (no job needs them again) and expired jobs are removed."""
        data = self.view(row).model_dump(mode="json")
        self.hub.publish(row.id, TERMINAL_EVENT[row.status], data)
        if row.webhook:
            self.webhooks.send(row.webhook, row.id, data)
        self.blobs.remove_uploads(row.id)
        if self.worker is not None:
            self.worker.drop_preloaded(row.id)
        expire(self.config, self.store, self.blobs)

    # -- server -------------------------------------------------------------------------------

    def health(self) -> schemas.Health:
        counts = self.store.counts()
        if self.worker is not None:
            ok = alive = self.worker.alive
        else:  # an API process: up when its queue answers; workers run elsewhere
            ok, alive = True, self.store.live_workers(WORKER_SEEN_S) > 0
        return schemas.Health(ok=ok, queue_length=counts[JobStatus.QUEUED],
                              running=counts[JobStatus.RUNNING], worker_alive=alive)

    async def status_events(
        self, keepalive_s: float | None = None
    ) -> AsyncIterator[schemas.Health]:
        """``health()`` now, then again after every change of any job's state (queued,
        started, ended; bursts coalesce into one) and after ``keepalive_s`` idle seconds, so a
        worker that died is noticed too. Never ends by itself."""
        watch = self.hub.watch(asyncio.get_running_loop())
        try:
            while True:
                yield await asyncio.to_thread(self.health)
                await watch.changed(keepalive_s)
        finally:
            watch.close()

    def models(self) -> schemas.ModelList:
        entries = self.registry.entries()
        return schemas.ModelList(
            data=[_model_card(entry.id, entry.path) for entry in entries],
            default=self.registry.default_id,
            task_defaults={task.value: self._default_or_none(task) for task in Task},
            models=[entry.id for entry in entries],
            loras=self.loras.ids(),
        )


def _spec(job_id: str, body: schemas.JobCreate, task: Task, model: str,
          uploads: Mapping[str, Upload]) -> JobSpec:
    """The job's spec from its body, the model chosen and the uploads (named after the job)."""
    # Fix the seed now: a job re-run after a crash must make the same result.
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
    files = {name: upload_name(job_id, name, upload.suffix) for name, upload in uploads.items()}
    # The fields the body carries as they are; the server decides model, seed and task.
    same = [name for name in passed_fields() if name not in ("model", "seed", "task", "outpaint")]
    return JobSpec(
        **{name: getattr(body, name) for name in same},
        model=model,
        seed=seed,
        task=task,
        outpaint=Outpaint(**body.outpaint.model_dump()) if body.outpaint is not None else None,
        loras=tuple(LoraRef(lora.id, lora.scale) for lora in body.loras),
        image=files.get("image"),
        mask=files.get("mask"),
    )


def _model_card(model_id: str, path: Path) -> schemas.ModelCard:
    """The model's card with its family, and whether it can be a ``refiner``: what the engine
    needs to hand a txt2img schedule over to it (``check_refiner``, then the family's img2img
    finish) is a family with a refiner hand-off and a checkpoint variant that runs img2img (an
    SDXL refiner or base; not an SDXL inpainting checkpoint). Cheap: configs only, nothing is
    loaded. A checkpoint that cannot be read is listed without a family, not left out."""
    from toile.families.base import RefinerHandoff
    from toile.families.registry import detect_family
    from toile.request import Mode

    card = schemas.ModelCard(id=model_id, created=_mtime(path))
    try:
        family = detect_family(path)
        modes = family.capabilities.get(family.variant(path), frozenset())
    except (ToileError, OSError, ValueError):
        return card
    card.family = family.name
    card.tasks = [task.value for task in Task if task in {mode.task for mode in modes}]
    card.refiner = isinstance(family, RefinerHandoff) and Mode.IMG2IMG in modes
    card.samplers = _sampler_options(path)
    return card


def _sampler_options(path: Path) -> list[schemas.SamplerOption]:
    """The samplers a job on the model at ``path`` can name, the model's own marked ``default``
    (first if it has no A1111 name, so it is always listed), each with the schedules it
    supports there. From configs and scheduler signatures (``checkpoint_samplers``); empty when
    the model's scheduler is not on disk (a single file) or cannot be read: a client then
    offers only the default."""
    from toile.families.registry import checkpoint_samplers

    try:
        menu = checkpoint_samplers(path)
        return [] if menu is None else [
            schemas.SamplerOption(name=name, schedules=list(schedules), default=default)
            for name, schedules, default in _menu_options(menu)
        ]
    except (ToileError, OSError, ValueError, TypeError, ImportError, AttributeError):
        log.debug("no sampler list for %s", path, exc_info=True)
        return []


@functools.lru_cache(maxsize=64)
def _menu_options(menu: SamplerMenu) -> tuple[tuple[str, tuple[str, ...], bool], ...]:
    """(name, schedules, is the model's own) per sampler of ``menu``; cached, since the model
    listing is read on every page load and a menu is a few names (frozen, hashable)."""
    own = menu.own()
    samplers = menu.samplers()
    if own not in samplers:
        samplers = (own, *samplers)
    return tuple(
        (sampler.name, tuple(schedule.value for schedule in menu.schedules(sampler)),
         sampler == own)
        for sampler in samplers
    )


def _build_engine(config: ServeConfig, policy: Any, *, runs_jobs: bool) -> Any:
    """The server's id-only Engine. An API process's never runs a job: it stays on the CPU
    (the machine may have no GPU) and loads no output checker."""
    from toile.engine.engine import Engine
    from toile.safety.watermark import WatermarkConfig

    engine = Engine(device=config.device if runs_jobs else "cpu", dtype=config.dtype,
                    allow_paths=False, policy=policy, on_flag=config.output_action,
                    watermark=WatermarkConfig(enabled=config.watermark))
    if config.output_checker and runs_jobs:
        from toile.safety.output_check import load_output_check

        engine.output_check = load_output_check(config.output_checker, engine.device)
    return engine


def _mtime(path: Path) -> int:
    """OpenAI's ``created`` for a model: when its files last changed (0 if unreadable)."""
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0

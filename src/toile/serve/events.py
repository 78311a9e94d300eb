"""Live job events, fanned out from the worker thread to any number of async subscribers.

The worker publishes from its own thread; subscribers are asyncio queues on the server's event
loop, fed with ``call_soon_threadsafe``, so a slow SSE client never blocks generation and no
thread is parked per open stream. Per job the hub remembers the latest ``started`` and
``progress`` events so a late subscriber is told the current state first; that memory is
dropped when the job ends (the durable state is in the store, not here).

Event types: ``queued``, ``started``, ``progress`` (step, total, stage, optional
``preview_png`` base64), ``finished``, ``failed``, ``cancelled``. The last three end a stream.

Besides per-job subscribers, a :class:`Watch` is told that *some* job changed state (any event
but ``progress``), for views of the whole server such as the queue counts.

:class:`EventBus` is what the server needs of events; :class:`EventHub` is the in-process one
(one server process), and ``events_pg.PgEventBus`` carries events between processes and
machines over PostgreSQL (LISTEN/NOTIFY), fanning them out to local subscribers with a hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

TERMINAL_EVENTS = frozenset({"finished", "failed", "cancelled"})
EVENT_TYPES = ("queued", "started", "progress", *sorted(TERMINAL_EVENTS))
MAX_PENDING = 256  # progress events beyond this backlog are dropped for that subscriber


@dataclass(frozen=True)
class JobEvent:
    type: str
    job_id: str
    data: dict[str, Any]
    id: int = 0

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    def sse(self) -> str:
        """The event in Server-Sent Events wire format."""
        payload = json.dumps({"type": self.type, "job_id": self.job_id, **self.data})
        return f"id: {self.id}\nevent: {self.type}\ndata: {payload}\n\n"


@dataclass
class _Live:
    started: JobEvent | None = None
    progress: JobEvent | None = None


class Subscription:
    """One subscriber's queue. ``get`` waits on the subscriber's event loop."""

    def __init__(self, hub: EventHub, job_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.job_id = job_id
        self.loop = loop
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._seen: set[str] = set()
        self._done = False

    def _deliver(self, event: JobEvent) -> None:
        """Called on the subscriber's loop. Drops what the snapshot already said."""
        if self._done:
            return
        if event.type in ("queued", "started"):
            if event.type in self._seen:
                return
            self._seen.add(event.type)
        if event.type == "progress" and self.queue.qsize() >= MAX_PENDING:
            return
        if event.terminal:
            self._done = True
        self.queue.put_nowait(event)

    def push(self, event: JobEvent) -> None:
        """Thread-safe: hand an event to the subscriber's loop."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is closed: the subscriber is gone
            self.hub.unsubscribe(self)

    async def get(self, timeout: float | None = None) -> JobEvent | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.hub.unsubscribe(self)


class Watch:
    """Told whenever any job is queued, starts or ends. Changes close together coalesce into
    one wake-up: a watcher re-reads the state it shows rather than replaying events."""

    def __init__(self, hub: EventHub, loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.loop = loop
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """Thread-safe: mark a change on the watcher's loop."""
        try:
            self.loop.call_soon_threadsafe(self._changed.set)
        except RuntimeError:  # the loop is closed: the watcher is gone
            self.hub.unwatch(self)

    async def changed(self, timeout: float | None = None) -> bool:
        """Wait for a change since the last call: True, or False after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    def close(self) -> None:
        self.hub.unwatch(self)


class EventBus(Protocol):
    """Publish job events, and deliver them to subscribers (SSE, the A1111 progress route,
    status watchers) of this process. ``send_cancel`` tells whichever process runs a job to
    stop it; a worker registers with ``on_cancel``."""

    def publish(self, job_id: str, kind: str, data: dict[str, Any]) -> JobEvent: ...

    def progress(self, job_id: str) -> dict[str, Any] | None: ...

    def subscribe(
        self,
        job_id: str,
        loop: asyncio.AbstractEventLoop,
        snapshot: Callable[[dict[str, JobEvent | None]], list[JobEvent]],
    ) -> Subscription: ...

    def watch(self, loop: asyncio.AbstractEventLoop) -> Watch: ...

    def subscriber_count(self) -> int: ...

    def send_cancel(self, job_id: str) -> None: ...

    def on_cancel(self, callback: Callable[[str], object]) -> None: ...

    def close(self) -> None: ...


@dataclass
class EventHub:
    """Fan-out of job events within one process; thread-safe. An :class:`EventBus`."""

    # Re-entrant: a snapshot callback may read live progress while the hub holds the lock.
    _lock: Any = field(default_factory=threading.RLock)
    _subscribers: dict[str, set[Subscription]] = field(default_factory=dict)
    _live: dict[str, _Live] = field(default_factory=dict)
    _watches: set[Watch] = field(default_factory=set)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _cancel_listeners: list[Callable[[str], object]] = field(default_factory=list)

    def publish(self, job_id: str, kind: str, data: dict[str, Any]) -> JobEvent:
        with self._lock:
            event = JobEvent(kind, job_id, data, next(self._ids))
            if kind == "started":
                self._live[job_id] = _Live(started=event)
            elif kind == "progress":
                self._live.setdefault(job_id, _Live()).progress = event
            elif kind in TERMINAL_EVENTS:
                self._live.pop(job_id, None)
            subscribers = list(self._subscribers.get(job_id, ()))
            watches = list(self._watches) if kind != "progress" else []
        for subscriber in subscribers:
            subscriber.push(event)
        for watch in watches:
            watch.notify()
        return event

    def progress(self, job_id: str) -> dict[str, Any] | None:
        """The latest progress of a running job (step, total, stage), without the preview."""
        with self._lock:
            live = self._live.get(job_id)
            if live is None or live.progress is None:
                return None
            return {k: v for k, v in live.progress.data.items() if k != "preview_png"}

    def subscribe(
        self,
        job_id: str,
        loop: asyncio.AbstractEventLoop,
        snapshot: Callable[[dict[str, JobEvent | None]], list[JobEvent]],
    ) -> Subscription:
        """Register a subscriber and queue the current state first.

        ``snapshot(live)`` turns the durable state plus the live events (``started``,
        ``progress``) into the first events (an ``id`` of 0 gets the next id); it runs under the
        hub's lock, so no event published meanwhile is missed or delivered before it.
        """
        subscription = Subscription(self, job_id, loop)
        with self._lock:
            live = self._live.get(job_id, _Live())
            first = snapshot({"started": live.started, "progress": live.progress})
            self._subscribers.setdefault(job_id, set()).add(subscription)
            for event in first:
                subscription.push(event if event.id else replace(event, id=next(self._ids)))
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            found = self._subscribers.get(subscription.job_id)
            if found is not None:
                found.discard(subscription)
                if not found:
                    del self._subscribers[subscription.job_id]

    def watch(self, loop: asyncio.AbstractEventLoop) -> Watch:
        """A :class:`Watch` on every job's state changes, woken on ``loop``."""
        watch = Watch(self, loop)
        with self._lock:
            self._watches.add(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def subscriber_count(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._subscribers.values())

    def send_cancel(self, job_id: str) -> None:
        """In one process the service signals its worker itself; listeners are for tests and
        embedders that run their own."""
        for callback in list(self._cancel_listeners):
            callback(job_id)

    def on_cancel(self, callback: Callable[[str], object]) -> None:
        self._cancel_listeners.append(callback)

    def close(self) -> None:
        """Nothing to release in one process."""


def close_quietly(subscription: Subscription | None) -> None:
    if subscription is not None:
        with contextlib.suppress(Exception):
            subscription.close()

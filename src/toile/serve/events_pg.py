"""Job events between processes over PostgreSQL: a worker on one machine publishes, SSE clients,
the A1111 progress route and status watchers of every API process receive.

How: ``publish`` fans the event out in this process (an :class:`EventHub`), writes its data to
``job_events`` and sends ``NOTIFY toile_events, '<origin> <event row id> <job id> <kind>'`` in
the same transaction (delivered at commit, so a listener never reads a row that is not there).
Every process LISTENs on its own connection in a thread; for a notification from another
origin it reads the rows and republishes them to its local hub. NOTIFY payloads stay small
(PostgreSQL caps them at 8000 bytes): the data, previews included, go through the table.
Rows older than ``EVENT_TTL_S`` are deleted (events are live state, not history: the durable
state is the ``jobs`` table).

Cancel: ``send_cancel`` sends ``NOTIFY toile_cancel, '<job id>'``; a worker process's listener
hands it to its worker, which stops the job at its next denoising step. (The worker's heartbeat
also reads ``cancel_requested`` from the row, so a lost notification only delays a cancel.)

A process started while a job runs learns the job's progress from its next event (a step).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

from toile.serve.events import TERMINAL_EVENTS, EventHub, JobEvent
from toile.serve.queue_pg import connect, redact

log = logging.getLogger("toile.serve")
EVENTS, CANCELS = "toile_events", "toile_cancel"
EVENT_TTL_S = 300.0
LISTEN_POLL_S = 0.5  # how often the listener looks up from waiting (to notice stop())
RECONNECT_S = 1.0


class PgEventBus(EventHub):
    """An :class:`~toile.serve.events.EventBus` shared by every process on one database."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.origin = uuid.uuid4().hex[:12]  # this process: its own notifications are skipped
        self._send_lock = threading.Lock()
        self._sender = connect(url)
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._listen_forever, name="toile-events",
                                        daemon=True)
        self._thread.start()
        self._listening.wait(10)  # events published before LISTEN would not reach this process

    # -- out ----------------------------------------------------------------------------------

    def publish(self, job_id: str, kind: str, data: dict[str, Any]) -> JobEvent:
        event = super().publish(job_id, kind, data)
        try:
            self._send(job_id, kind, data)
        except Exception:  # an event is live state: never fail a job or a request over it
            log.warning("could not publish the %s event of job %s", kind, job_id, exc_info=True)
        return event

    def _send(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        with self._send_lock:
            db = self._connection()
            with db.transaction():
                row = db.execute(
                    "INSERT INTO job_events (job_id, kind, data, created_at) VALUES "
                    "(%s, %s, %s, EXTRACT(EPOCH FROM clock_timestamp())) RETURNING id",
                    (job_id, kind, json.dumps(data)),
                ).fetchone()
                db.execute("SELECT pg_notify(%s, %s)",
                           (EVENTS, f"{self.origin} {row['id']} {job_id} {kind}"))
                if kind in TERMINAL_EVENTS:
                    db.execute(
                        "DELETE FROM job_events WHERE created_at < "
                        "EXTRACT(EPOCH FROM clock_timestamp()) - %s", (EVENT_TTL_S,))

    def send_cancel(self, job_id: str) -> None:
        super().send_cancel(job_id)
        with self._send_lock:
            self._connection().execute("SELECT pg_notify(%s, %s)", (CANCELS, job_id))

    def _connection(self) -> Any:
        if self._sender.closed or self._sender.broken:
            self._sender.close()
            self._sender = connect(self.url)
        return self._sender

    def close(self) -> None:
        self._stop.set()
        self._thread.join(LISTEN_POLL_S * 4)
        with self._send_lock:
            self._sender.close()

    # -- in -----------------------------------------------------------------------------------

    def _listen_forever(self) -> None:
        """LISTEN until ``close``; reconnect after the database went away."""
        while not self._stop.is_set():
            try:
                with connect(self.url) as db:
                    db.execute(f"LISTEN {EVENTS}")
                    db.execute(f"LISTEN {CANCELS}")
                    self._listening.set()
                    self._listen(db)
            except Exception:
                log.warning("event listener lost %s; reconnecting", redact(self.url),
                            exc_info=True)
                self._stop.wait(RECONNECT_S)

    def _listen(self, db: Any) -> None:
        while not self._stop.is_set():
            # stop_after=1: hand over as soon as something arrives (a cancel must not wait).
            received = list(db.notifies(timeout=LISTEN_POLL_S, stop_after=1))
            cancels = [n.payload for n in received if n.channel == CANCELS]
            for job_id in cancels:
                EventHub.send_cancel(self, job_id)
            wanted = [int(fields[1]) for n in received if n.channel == EVENTS
                      and len(fields := n.payload.split(" ")) == 4 and fields[0] != self.origin]
            if wanted:
                self._republish(db, wanted)

    def _republish(self, db: Any, ids: list[int]) -> None:
        rows = db.execute(
            "SELECT job_id, kind, data FROM job_events WHERE id = ANY(%s) ORDER BY id", (ids,)
        ).fetchall()
        for row in rows:
            EventHub.publish(self, row["job_id"], row["kind"], json.loads(row["data"]))


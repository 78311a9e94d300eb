"""Helpers for the server tests: a tiny-model engine, a scripted engine wrapper (gates, failures),
an in-process server, SSE parsing and tiny images (valid, bomb) as base64."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BASE_URL = "http://127.0.0.1:7860"  # TestClient's Host: a loopback name, as a browser would send
MODEL = "tiny-sd"


def tiny_engine(model_path: Path, registry_dir: Path) -> Any:
    """An id-only engine whose registry knows the tiny SD folder as ``tiny-sd`` (and nothing
    else besides the built-in id, which the tests never run)."""
    from toile.engine.engine import Engine
    from toile.engine.models import ModelRegistry

    registry = ModelRegistry(registry_dir / "models.json")
    registry.add(MODEL, model_path)
    return Engine(registry, device="cpu", allow_paths=False)


class ScriptedEngine:
    """Wraps a real engine. ``fail[prompt] = exception`` makes that prompt raise;
    ``gate_at = n`` blocks the run after reporting step n until ``release()``; every progress
    step is recorded per prompt in ``steps``."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.registry = engine.registry
        self.allow_paths = engine.allow_paths
        self.fail: dict[str, BaseException] = {}
        self.gate_at: int | None = None
        self.reached = threading.Event()
        self._gate = threading.Event()
        self.steps: dict[str, list[int]] = {}

    def model_info(self, model: str | None = None) -> Any:
        return self.engine.model_info(model)

    def default_model(self, task: Any) -> str:
        return self.engine.default_model(task)

    def models_for(self, task: Any) -> list[str]:
        return self.engine.models_for(task)

    def release(self) -> None:
        self._gate.set()

    def run(
        self, request: Any, *, progress: Any = None, cancel: Any = None, preview_every: int = 0
    ):
        if request.prompt in self.fail:
            raise self.fail[request.prompt]
        seen = self.steps.setdefault(request.prompt, [])

        def on_progress(event: Any) -> None:
            seen.append(event.step)
            if progress is not None:
                progress(event)
            if self.gate_at is not None and event.step == self.gate_at:
                self.reached.set()
                self._gate.wait(30)

        return self.engine.run(
            request, progress=on_progress, cancel=cancel, preview_every=preview_every
        )


@contextlib.contextmanager
def serve(engine: Any, data_dir: Path, **config: Any) -> Iterator[Any]:
    """An in-process server (lifespan run) and a TestClient for it."""
    from fastapi.testclient import TestClient

    from toile.serve.app import create_app
    from toile.serve.config import ServeConfig

    app = create_app(ServeConfig(data_dir=data_dir, **config), engine=engine)
    with TestClient(app, base_url=BASE_URL) as client:
        yield client


@contextlib.contextmanager
def live_server(engine: Any, data_dir: Path, **config: Any) -> Iterator[int]:
    """The app under uvicorn in a thread on a free loopback port (real sockets, for clients
    such as webuiapi and Chromium that cannot use TestClient); yields the port."""
    import uvicorn

    from toile.serve.app import create_app
    from toile.serve.config import ServeConfig
    from toile.serve.process import free_port

    port = free_port()
    app = create_app(ServeConfig(data_dir=data_dir, port=port, **config), engine=engine)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 120, "the server to start")
    assert server.started, "uvicorn did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def wait_job(client: Any, job_id: str, timeout: float = 60.0, headers: Any = None) -> dict:
    """Poll until the job ends (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.05)


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        kind, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if kind and data:
            events.append((kind, json.loads("\n".join(data))))
    return events


def png_b64(width: int = 32, height: int = 32) -> str:
    from helpers import gradient_image

    buffer = io.BytesIO()
    gradient_image(width, height).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bomb_png_b64(side: int = 100_000) -> str:
    """A valid PNG header declaring side x side pixels with almost no data: decoding it would
    need ~10 GB; the server must refuse it from the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    raw += chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()

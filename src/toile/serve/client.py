"""A small HTTP client for the native API, on urllib (no HTTP library needed).

Used by the tests that talk to a real server process and by ``python -m toile.serve.bench``;
handy from scripts too. Every wait is bounded by a timeout.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from toile.serve.spec import TERMINAL


class ServeHTTPError(Exception):
    """A non-2xx answer; ``status`` and the JSON ``body`` (if any) are kept."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {body}")


class ServeClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _open(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=all_headers
        )
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload: Any = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
            raise ServeHTTPError(exc.code, payload) from None

    def call(self, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
        with self._open(
            method, path, body, {k.replace("_", "-"): v for k, v in headers.items()}
        ) as r:
            raw = r.read()
            kind = r.headers.get("Content-Type", "")
            return r.status, json.loads(raw) if "json" in kind else raw

    def health(self) -> dict[str, Any]:
        return self.call("GET", "/health")[1]

    def submit(self, idempotency_key: str | None = None, **fields: Any) -> dict[str, Any]:
        headers = {"Idempotency_Key": idempotency_key} if idempotency_key else {}
        return self.call("POST", "/v1/jobs", fields, **headers)[1]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}")[1]

    def jobs(self, limit: int = 100) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs?limit={limit}")[1]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/jobs/{job_id}/cancel")[1]

    def image(self, image_id_or_url: str) -> bytes:
        path = (
            image_id_or_url if image_id_or_url.startswith("/") else f"/v1/images/{image_id_or_url}"
        )
        return self.call("GET", path)[1]

    def wait(self, job_id: str, timeout: float = 120.0, poll_s: float = 0.05) -> dict[str, Any]:
        """Poll until the job ends; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll_s)

    def events(self, job_id: str, timeout: float = 120.0) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's SSE stream as (type, data) pairs, until the terminal event."""
        deadline = time.monotonic() + timeout
        with self._open(
            "GET",
            f"/v1/jobs/{job_id}/events",
            headers={"Accept": "text/event-stream"},
            timeout=timeout,
        ) as stream:
            kind, data = "message", []
            for raw in stream:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"events of job {job_id} did not end within {timeout}s")
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if data:
                        payload = json.loads("\n".join(data))
                        yield kind, payload
                        if kind in ("finished", "failed", "cancelled"):
                            return
                    kind, data = "message", []
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())

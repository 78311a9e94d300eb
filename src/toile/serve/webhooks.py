"""Webhooks: one POST with the finished job as JSON, from a small thread pool.

Delivery is at least once: the outcome is stored on the job (``webhook_status``), and a job that
ended but whose webhook was never attempted (the server stopped in between) is sent again at
start-up. A slow or failing receiver is logged and recorded; it never blocks the worker or fails
the job. Redirects are not followed (a webhook goes to the URL the client named, nowhere else).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from toile.errors import RequestError

log = logging.getLogger("toile.serve")


def check_webhook_url(url: str) -> str:
    """An absolute http(s) URL with a host; anything else is a 422 naming ``webhook``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise RequestError("webhook", "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError("webhook", "must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise RequestError("webhook", "must not carry credentials in the URL")
    if any(ch.isspace() for ch in url):
        raise RequestError("webhook", "must not contain whitespace")
    return url


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookSender:
    """Posts job bodies; ``record(job_id, status)`` stores each outcome."""

    def __init__(self, timeout_s: float, record: Callable[[str, str], None]) -> None:
        self.timeout_s = timeout_s
        self.record = record
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="toile-webhook")
        self._opener = urllib.request.build_opener(_NoRedirect())

    def send(self, url: str, job_id: str, body: dict[str, Any]) -> None:
        self._pool.submit(self._deliver, url, job_id, body)

    def _deliver(self, url: str, job_id: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        request = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "toile-serve"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                status = f"delivered: HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            status = f"failed: HTTP {exc.code}"
        except Exception as exc:  # any network failure is logged, never fatal
            status = f"failed: {type(exc).__name__}: {exc}"
        if not status.startswith("delivered"):
            log.warning("webhook for job %s to %s %s", job_id, url, status)
        try:
            self.record(job_id, status)
        except Exception:
            log.exception("could not record the webhook status of job %s", job_id)

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

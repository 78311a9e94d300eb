"""Who may talk to the server: a pure ASGI middleware (so streamed SSE responses pass through
untouched) that runs four checks in order, each answering with a JSON error naming the header:

1. **Host** (only without a token): the ``Host`` header must be a loopback name, the bind
   address or a configured ``allowed_hosts`` entry. Without it, a web page on any site could use
   DNS rebinding to reach a server on 127.0.0.1 from the user's browser.
2. **Token** (only with tokens configured): ``Authorization: Bearer <token>`` on every path
   except the web page's static files (``/``, ``/static/...``) and ``/health``; compared in
   constant time. The admin token (``api_token``) sees everything; each ``[clients]`` token is
   one client, which sees only its own jobs (``scope["state"]["toile_client"]``, read by
   ``routes.deps.caller``).
3. **Origin** for state-changing methods (POST, PUT, PATCH, DELETE): a browser's
   ``Sec-Fetch-Site`` must be ``same-origin`` or ``none``, and an ``Origin`` header must be the
   server's own origin (or a configured ``allowed_origins`` entry). This stops cross-site form
   posts and fetches (CSRF) even on a loopback server without a token. Non-browser clients
   send neither header and pass.
4. **Body size**: ``Content-Length`` over ``max_body_bytes`` is refused before reading; a body
   without a length is read up to the cap and refused past it (413).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from toile.serve.config import ServeConfig, is_loopback_host

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": "80", "https": "443"}


def is_public_path(path: str) -> bool:
    """Paths served without a token: the web page and its static files, and the health check."""
    return path in ("/", "/health") or path.startswith("/static/")


def _split_host(value: str) -> tuple[str, str | None]:
    """``host[:port]`` (IPv6 in brackets) -> (lower-case host, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, sep, port = value.rpartition(":")
    return (host, port) if sep and port.isdigit() else (value, None)


def _normal_netloc(host: str, port: str | None, scheme: str) -> str:
    if port is None or port == DEFAULT_PORTS.get(scheme):
        return host
    return f"{host}:{port}"


def error_response(status: int, kind: str, field: str, message: str) -> tuple[int, bytes]:
    body = {"error": {"type": kind, "field": field, "message": f"{field}: {message}"}}
    return status, json.dumps(body).encode()


class SecurityMiddleware:
    """See the module docstring. Configured once; holds no per-request state."""

    def __init__(self, app: ASGIApp, config: ServeConfig) -> None:
        self.app = app
        self.config = config
        # token -> client name ("" for the admin's token)
        self._tokens = {token.encode(): name for name, token in config.clients.items()}
        if config.api_token:
            self._tokens[config.api_token.encode()] = ""
        self._token = bool(self._tokens) or None
        allowed = {"localhost", "127.0.0.1", "::1", config.host.lower().strip("[]")}
        self._hosts = allowed | {h.lower() for h in config.allowed_hosts}
        self._origins = {o.rstrip("/").lower() for o in config.allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._check(scope, headers)
        if refusal is not None:
            await self._send_error(send, *refusal)
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await self._send_error(
                    send, *error_response(400, "bad_request", "Content-Length", "is not a number")
                )
                return
            if int(length) > self.config.max_body_bytes:
                await self._send_error(send, *self._too_large())
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in UNSAFE_METHODS:
            receive = await self._buffered(receive)
            if receive is None:
                await self._send_error(send, *self._too_large())
                return
        await self.app(scope, receive, send)

    def _too_large(self) -> tuple[int, bytes]:
        return error_response(
            413,
            "too_large",
            "body",
            f"is larger than the server's limit of {self.config.max_body_bytes} bytes",
        )

    def _check(self, scope: Scope, headers: dict[str, str]) -> tuple[int, bytes] | None:
        scheme = scope.get("scheme", "http")
        host_header = headers.get("host", "")
        host, port = _split_host(host_header)
        if self._token is None and host not in self._hosts and not is_loopback_host(host):
            return error_response(
                403,
                "forbidden_host",
                "Host",
                f"{host_header!r} is not a name of this server "
                "(set allowed_hosts, or use an API token)",
            )
        if self._token is not None and not is_public_path(scope["path"]):
            auth = headers.get("authorization", "")
            kind, _, token = auth.partition(" ")
            client = self._client(token.strip().encode()) if kind.lower() == "bearer" else None
            if client is None:
                return error_response(
                    401, "unauthorized", "Authorization", "a valid 'Bearer <token>' is required"
                )
            scope.setdefault("state", {})["toile_client"] = client
        if scope.get("method") in UNSAFE_METHODS:
            site = headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return error_response(
                    403, "cross_origin", "Sec-Fetch-Site", f"{site!r} requests may not change state"
                )
            origin = headers.get("origin")
            if origin is not None and not self._same_origin(origin, scheme, host, port):
                return error_response(
                    403, "cross_origin", "Origin", f"{origin!r} may not change state on this server"
                )
        return None

    def _client(self, token: bytes) -> str | None:
        """The client a token belongs to ("" = admin), or None; every configured token is
        compared, in constant time, so timing tells nothing about which one was close."""
        found = None
        for known, name in self._tokens.items():
            if hmac.compare_digest(token, known):
                found = name
        return found

    def _same_origin(self, origin: str, scheme: str, host: str, port: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self._origins:
            return True
        try:
            parts = urlsplit(origin)
            origin_port = str(parts.port) if parts.port is not None else None
        except ValueError:
            return False  # includes "null" and garbage
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        # Scheme may differ (TLS ended by a proxy in front); host and port must match exactly.
        own = _normal_netloc(host, port, scheme)
        return _normal_netloc(parts.hostname, origin_port, parts.scheme) == own

    async def _buffered(self, receive: Receive) -> Receive | None:
        """Read a length-less body up to the cap; None if it is longer. Returns a receive that
        replays it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _send_error(send: Send, status: int, body: bytes) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="toile"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

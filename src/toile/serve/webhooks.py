"""Webhooks: one POST with the finished job as JSON, from a small thread pool.

Delivery is at least once: the outcome is stored on the job (``webhook_status``: ``delivered``
or ``failed``, the reason only in the server's log), and a job that ended but whose webhook was
never attempted (the server stopped in between) is sent again at start-up. A slow or failing
receiver is logged and recorded; it never blocks the worker or fails the job.

A webhook URL comes from a client, so the server must not become its way into the server's own
network (SSRF): the host is resolved once, every address it resolves to must be public (not
loopback, private, link-local, multicast, reserved or unspecified, in IPv4 or IPv6, IPv4-mapped
forms included) unless the config's ``webhook_allow`` ranges admit it, the connection is made to
that checked address (so a second DNS answer cannot swap it: DNS rebinding) and the address
actually connected to is checked again; redirects are not followed. Literal addresses in any
spelling (``2130706433``, ``0x7f.1``, ``[::ffff:127.0.0.1]``) are refused at submit.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from toile.errors import RequestError

log = logging.getLogger("toile.serve")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddressError(OSError):
    """The webhook's host is (or resolves to) an address the server may not reach."""


def allowed_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def is_public(address: Address) -> bool:
    """A globally routable unicast address (IPv4-mapped/compatible IPv6 judged as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or (address.sixtofour if address.sixtofour else None)
        if mapped is not None:
            return is_public(mapped)
    return address.is_global and not address.is_multicast


def check_address(address: Address, allow: Sequence[Network]) -> None:
    if is_public(address) or any(address in network for network in allow):
        return
    raise BlockedAddressError(f"{address} is not a public address")


def _numeric_host(host: str) -> Address | None:
    """The address a host written as a number stands for, in any spelling the resolver takes
    (``127.1``, ``0x7f000001``, ``2130706433``, ``::ffff:7f00:1``); None for a name."""
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    return ipaddress.ip_address(infos[0][4][0].split("%")[0])


def check_webhook_url(url: str, allow: Sequence[Network] = ()) -> str:
    """An absolute http(s) URL with a host, not a literal non-public address; anything else is
    a 422 naming ``webhook``. Host names are checked when delivering (after resolving)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise RequestError("webhook", "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError("webhook", "must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise RequestError("webhook", "must not carry credentials in the URL")
    if any(ch.isspace() for ch in url):
        raise RequestError("webhook", "must not contain whitespace")
    address = _numeric_host(parts.hostname)
    if address is not None:
        try:
            check_address(address, allow)
        except BlockedAddressError:
            raise RequestError(
                "webhook",
                "must reach a public address; loopback, private, link-local, multicast and "
                "reserved addresses are refused (the server's webhook_allow admits ranges)",
            ) from None
    return url


def resolve_public(host: str, port: int, allow: Sequence[Network]) -> list[tuple[Address, Any]]:
    """Every address ``host`` resolves to, each checked; raises BlockedAddressError if any is
    not allowed (a name with one private answer is refused as a whole)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found = []
    for family, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        check_address(address, allow)
        found.append((address, (family, sockaddr)))
    if not found:
        raise BlockedAddressError(f"{host} resolves to no address")
    return found


def _connect(host: str, port: int, timeout: float, allow: Sequence[Network]) -> socket.socket:
    """A TCP connection to a checked address of ``host``; the peer is checked once more."""
    last: OSError | None = None
    for address, (family, sockaddr) in resolve_public(host, port, allow):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            peer = ipaddress.ip_address(str(sock.getpeername()[0]).split("%")[0])
            check_address(peer, allow)
            if peer != address:
                raise BlockedAddressError(f"connected to {peer}, not the checked {address}")
            return sock
        except OSError as exc:
            sock.close()
            last = exc
            if isinstance(exc, BlockedAddressError):
                raise
    raise last or OSError(f"cannot connect to {host}")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int | None, timeout: float,
                 allow: Sequence[Network]) -> None:
        super().__init__(host, port, timeout=timeout)
        self._allow = allow

    def connect(self) -> None:
        self.sock = _connect(self.host, self.port, float(self.timeout), self._allow)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int | None, timeout: float,
                 allow: Sequence[Network]) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._allow = allow

    def connect(self) -> None:
        sock = _connect(self.host, self.port, float(self.timeout), self._allow)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post_json(url: str, body: bytes, timeout: float, allow: Sequence[Network]) -> int:
    """POST ``body`` to ``url`` through a checked, pinned connection; returns the HTTP status.
    Redirects are answers like any other (never followed)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    connection = cls(host, parts.port, timeout, allow)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        connection.request("POST", path, body=body, headers={
            "Content-Type": "application/json", "User-Agent": "toile-serve"})
        response = connection.getresponse()
        response.read(65536)
        return response.status
    finally:
        connection.close()


class WebhookSender:
    """Posts job bodies; ``record(job_id, status)`` stores each outcome (``delivered`` or
    ``failed``: what went wrong is for the operator's log, not for clients)."""

    def __init__(self, timeout_s: float, record: Callable[[str, str], None],
                 allow: Sequence[str] = ()) -> None:
        self.timeout_s = timeout_s
        self.record = record
        self.allow = allowed_networks(allow)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="toile-webhook")

    def send(self, url: str, job_id: str, body: dict[str, Any]) -> None:
        self._pool.submit(self._deliver, url, job_id, body)

    def _deliver(self, url: str, job_id: str, body: dict[str, Any]) -> None:
        try:
            code = post_json(url, json.dumps(body).encode(), self.timeout_s, self.allow)
            ok, detail = 200 <= code < 300, f"HTTP {code}"
        except Exception as exc:  # any network failure is logged, never fatal
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            log.warning("webhook for job %s to %s failed: %s", job_id, url, detail)
        try:
            self.record(job_id, "delivered" if ok else "failed")
        except Exception:
            log.exception("could not record the webhook status of job %s", job_id)

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

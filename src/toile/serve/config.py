"""The server's configuration: one typed, frozen dataclass.

Sources, later ones win: the defaults here, a TOML (or JSON) file given with ``--config``, the
``TOILE_API_TOKEN`` environment variable, then command-line flags. Every value is checked when
the config is built, so a bad file fails at start-up with the key named, not mid-request.

Example ``serve.toml``::

    data_dir = "/var/lib/toile"        # jobs.sqlite3, images/, uploads/ live here
    max_image_pixels = 4194304
    policy = "policy.toml"             # prompt-policy rules added to toile's defaults
    webhook_allow = ["10.0.0.0/8"]     # private ranges webhooks may reach (public: always)
    [loras]                            # LoRA ids clients may name -> files on this machine
    watercolor = "/models/loras/watercolor.safetensors"
    [clients]                          # client tokens; each sees only its own jobs
    studio-a = "a-long-random-token"

Scaling out (README "Scaling out"): ``queue = "postgresql://..."`` puts the job queue and live
events in PostgreSQL; ``toile serve`` then runs API only and ``toile worker`` processes run the
jobs, all sharing ``data_dir`` (a shared mount across machines) for uploads and images.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from toile.config import toile_home
from toile.errors import RequestError
from toile.request import MAX_IMAGES, MAX_STEPS

TOKEN_ENV = "TOILE_API_TOKEN"
LORA_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def default_data_dir() -> Path:
    return toile_home() / "serve"


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach. Any other name counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``create_app`` and ``toile serve`` need. Sizes are bytes, times seconds."""

    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = field(default_factory=default_data_dir)
    api_token: str | None = None  # the admin's token: sees and cancels every client's jobs
    # Clients by name -> token ([clients] in TOML): each sees only its own jobs and images.
    clients: Mapping[str, str] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    # LoRAs are named by id only; a client can never pass a file path (see README "Serve").
    loras: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    # Origins besides the server's own that may send state-changing requests (e.g. a web UI
    # served elsewhere). Hosts besides loopback names that may appear in the Host header when
    # no token is set (the DNS-rebinding guard).
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 48 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_steps: int = 200
    max_images: int = 8
    max_queue: int = 1000
    # Queued jobs one client (a [clients] name; without clients, everyone together) may have
    # waiting; one more is a 429 naming this limit. 0: no limit but max_queue.
    max_queued_per_client: int = 0
    max_attempts: int = 3
    # None: the embedded queue (SQLite in data_dir, one worker in the server process). A
    # postgresql:// URL: the shared queue of API processes and `toile worker`s.
    queue: str | None = None
    # Seconds a worker holds a job without a heartbeat; after that the job goes back to the
    # queue (a worker killed, a machine gone). Heartbeats come every lease_s / 3 (at most 5 s).
    lease_s: float = 30.0
    preview_every: int = 5
    preview_size: int = 128
    # The prompt policy: toile's default rules, plus (or, with replace_defaults = true in the
    # file, instead of) the rules in ``policy``; ``policy_enabled = false`` turns it off.
    policy: Path | None = None
    policy_enabled: bool = True
    # An output check every generated image passes (a Stable Diffusion safety-checker folder,
    # or module:callable returning a toile.safety.output_check.OutputCheck) and what a flagged
    # image becomes: pass, blur, withhold (the job fails with the reason) or flag.
    output_checker: str | None = None
    output_action: str = "withhold"
    # The invisible watermark on every result (safety.watermark): on unless turned off here.
    watermark: bool = True
    # C2PA content credentials on every result PNG: a PEM certificate chain and its key.
    c2pa_cert: Path | None = None
    c2pa_key: Path | None = None
    # Days a finished job's record and result images are kept (0: for ever). Uploads are
    # deleted as soon as their job ends, whatever this says.
    retention_days: float = 0.0
    webhooks: bool = True
    webhook_timeout_s: float = 5.0
    # Address ranges (CIDR) webhooks may reach although they are not public (loopback, private,
    # link-local...): e.g. ["10.0.0.0/8"] for a receiver on the deployment's own network.
    webhook_allow: tuple[str, ...] = ()
    sse_keepalive_s: float = 15.0

    def __post_init__(self) -> None:
        _check_int("port", self.port, 0, 65535)
        for name, low, high in (
            ("max_body_bytes", 1024, 2**34),
            ("max_image_bytes", 1024, 2**34),
            ("max_image_pixels", 64, 2**31),
            ("max_steps", 1, MAX_STEPS),
            ("max_images", 1, MAX_IMAGES),
            ("max_queue", 1, 10**7),
            ("max_queued_per_client", 0, 10**7),
            ("max_attempts", 1, 100),
            ("preview_every", 0, MAX_STEPS),
            ("preview_size", 16, 1024),
        ):
            _check_int(name, getattr(self, name), low, high)
        if self.output_action not in ("pass", "blur", "withhold", "flag"):
            raise RequestError(
                "output_action", f"must be pass, blur, withhold or flag, got {self.output_action!r}"
            )
        days = self.retention_days
        if isinstance(days, bool) or not isinstance(days, int | float) or not 0 <= days <= 36500:
            raise RequestError("retention_days", f"must be a number of days >= 0, got {days!r}")
        lease = self.lease_s
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not 1 <= lease <= 3600:
            raise RequestError("lease_s", f"must be seconds in [1, 3600], got {lease!r}")
        if self.queue is not None and (
            not isinstance(self.queue, str) or not self.queue.startswith(("postgresql://",
                                                                          "postgres://"))
        ):
            raise RequestError("queue", "must be a postgresql://user@host/database URL (or unset "
                                        "for the embedded SQLite queue)")
        for name in ("webhook_timeout_s", "sse_keepalive_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value <= 600
            ):
                raise RequestError(name, f"must be a number of seconds in (0, 600], got {value!r}")
        if self.api_token is not None and (
            not isinstance(self.api_token, str) or len(self.api_token) < 8 or " " in self.api_token
        ):
            raise RequestError("api_token", "must be at least 8 characters without spaces")
        clients = {}
        for name, token in dict(self.clients).items():
            if not name or len(name) > 64 or not set(name) <= LORA_ID_CHARS:
                raise RequestError("clients", f"name {name!r}: use 1-64 letters, digits, . _ -")
            if not isinstance(token, str) or len(token) < 8 or " " in token:
                raise RequestError(f"clients.{name}", "token: at least 8 characters, no spaces")
            if token == self.api_token or token in clients.values():
                raise RequestError(f"clients.{name}", "token: each client needs its own token")
            clients[name] = token
        object.__setattr__(self, "clients", MappingProxyType(clients))
        if not isinstance(self.host, str) or not self.host:
            raise RequestError("host", "must be a host name or address")
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        for name in ("policy", "c2pa_cert", "c2pa_key"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).expanduser())
        loras = {}
        for lora_id, path in dict(self.loras).items():
            if not lora_id or len(lora_id) > 64 or not set(lora_id) <= LORA_ID_CHARS:
                raise RequestError("loras", f"id {lora_id!r}: use 1-64 letters, digits, . _ -")
            target = Path(str(path)).expanduser()
            if target.suffix.lower() != ".safetensors":
                raise RequestError(f"loras.{lora_id}", f"{target} must be a .safetensors file")
            loras[lora_id] = target
        object.__setattr__(self, "loras", MappingProxyType(loras))
        object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        for cidr in self.webhook_allow:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except (TypeError, ValueError):
                raise RequestError(
                    "webhook_allow", f"{cidr!r} is not an address range such as 10.0.0.0/8"
                ) from None
        object.__setattr__(self, "webhook_allow", tuple(self.webhook_allow))

    @property
    def distributed(self) -> bool:
        """API processes and workers share a PostgreSQL queue (no worker in ``toile serve``)."""
        return self.queue is not None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    def check_bind(self) -> None:
        """Refuse to listen beyond loopback without a token: the queue would be open to anyone
        on the network, and every job costs GPU time."""
        if not is_loopback_host(self.host) and not self.api_token and not self.clients:
            raise RequestError(
                "host",
                f"refusing to listen on {self.host} without an API token: anyone who can reach "
                f"it could use the server. Set --api-token or {TOKEN_ENV}, or bind 127.0.0.1",
            )

    def check_files(self) -> None:
        """Every configured LoRA file exists and the policy file reads (checked at start-up,
        not on a client's request)."""
        for lora_id, path in self.loras.items():
            if not path.is_file():
                raise RequestError(f"loras.{lora_id}", f"{path} does not exist")
        self.build_policy()
        self.build_credentials()

    def build_credentials(self) -> Any:
        """The C2PA signing configuration (checked), or None when not configured."""
        if self.c2pa_cert is None and self.c2pa_key is None:
            return None
        if self.c2pa_cert is None or self.c2pa_key is None:
            raise RequestError("c2pa_cert", "set both c2pa_cert and c2pa_key, or neither")
        from toile.safety.c2pa_credentials import load_c2pa_config

        return load_c2pa_config(self.c2pa_cert, self.c2pa_key)

    def build_policy(self) -> Any:
        """The server's prompt policy (a ``toile.safety.policy.Policy``), or None when off."""
        from toile.safety.policy import Policy

        if not self.policy_enabled:
            return None
        if self.policy is None:
            return Policy.default()
        return Policy.from_file(self.policy, base=Policy.default())

    def with_changes(self, **changes: Any) -> ServeConfig:
        return replace(self, **changes)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(name, f"must be an integer in [{low}, {high}], got {value!r}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (or ``.json``) file as a dict of ServeConfig fields. Relative paths in it are
    relative to the file, so a config works from any working directory."""
    import tomllib

    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise RequestError("config", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RequestError("config", f"{path} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("config", f"{path} must hold a table of settings")
    known = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RequestError(
            unknown[0], f"unknown setting in {path}; known: {', '.join(sorted(known))}"
        )
    base = path.parent.resolve()
    for name in ("data_dir", "policy", "c2pa_cert", "c2pa_key"):
        if name in data:
            data[name] = base / Path(str(data[name])).expanduser()
    if "clients" in data and not isinstance(data["clients"], dict):
        raise RequestError("clients", 'must be a table of name = "token"')
    if "loras" in data:
        if not isinstance(data["loras"], dict):
            raise RequestError("loras", 'must be a table of id = "file.safetensors"')
        data["loras"] = {k: base / Path(str(v)).expanduser() for k, v in data["loras"].items()}
    for name in ("allowed_origins", "allowed_hosts", "webhook_allow"):
        if name in data:
            if not isinstance(data[name], list) or not all(isinstance(v, str) for v in data[name]):
                raise RequestError(name, "must be a list of strings")
            data[name] = tuple(data[name])
    return data


def build_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> ServeConfig:
    """Defaults < config file < ``TOILE_API_TOKEN`` < explicit overrides (``None`` = unset)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = read_config_file(path) if path is not None else {}
    if env.get(TOKEN_ENV):
        values["api_token"] = env[TOKEN_ENV]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServeConfig(**values)

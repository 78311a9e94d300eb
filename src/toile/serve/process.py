"""Run ``toile serve`` (and ``toile worker``) as subprocesses on a loopback port: start, wait
until healthy, stop, or ``kill -9`` them. The durability and scale-out tests and the benchmark
use this to crash real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from toile.serve.client import ServeClient


def free_port() -> int:
    """A currently free loopback port (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _ChildProcess:
    """What both kinds share: the process, its log, kill -9 and a graceful stop."""

    proc: subprocess.Popen[bytes] | None
    log: Path

    def kill(self) -> None:
        """``kill -9``: no clean-up of any kind runs in the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """A graceful stop (SIGTERM), then SIGKILL if it does not end in ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class ServerProcess(_ChildProcess):
    """One ``toile serve`` process. ``log`` collects its stdout and stderr."""

    def __init__(
        self,
        data_dir: Path,
        *,
        config: Path | None = None,
        port: int | None = None,
        token: str | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        queue: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.queue = queue  # a shared PostgreSQL queue: API only, jobs run in WorkerProcesses
        self.port = port or free_port()
        self.token = token
        self.env = dict(os.environ if env is None else env)
        self.log = log or self.data_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 30.0) -> ServeClient:
        return ServeClient(self.url, token=self.token, timeout=timeout)

    def start(self, timeout: float = 180.0) -> ServerProcess:
        """Start and wait until ``/health`` answers (bounded by ``timeout``)."""
        command = [
            sys.executable,
            "-m",
            "toile.cli.main",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "warning",
        ]
        if self.config is not None:
            command += ["--config", str(self.config)]
        if self.queue is not None:
            command += ["--queue", self.queue]
        env = dict(self.env)
        if self.token:
            env["TOILE_API_TOKEN"] = self.token
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        client = self.client(timeout=2.0)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if client.health().get("ok"):
                    return self
            except OSError:
                pass
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess(_ChildProcess):
    """One ``toile worker`` process on a shared queue. ``start`` returns once it runs; it says
    it is alive through the queue (an API process's ``/health``: ``worker_alive``)."""

    def __init__(
        self,
        queue: str,
        data_dir: Path,
        *,
        device: str = "cpu",
        config: Path | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.queue = queue
        self.data_dir = Path(data_dir)
        self.device = device
        self.config = config
        self.env = dict(os.environ if env is None else env)
        self.log = log or self.data_dir.parent / f"worker-{id(self)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        command = [sys.executable, "-m", "toile.cli.main", "worker", "--queue", self.queue,
                   "--data-dir", str(self.data_dir), "--device", self.device,
                   "--log-level", "warning"]
        if self.config is not None:
            command += ["--config", str(self.config)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env)
        return self

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

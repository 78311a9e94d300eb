"""A throwaway PostgreSQL for the tests: ``initdb`` in a temporary folder, the server on a free
loopback port, fsync off (nothing here must survive a power cut), removed afterwards.

PostgreSQL refuses to run as root; under root (CI containers) it runs as the ``postgres`` user
Debian's package creates, else ``nobody``."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from toile.serve.process import free_port


def pg_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: PATH first, then Debian's layout."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    return None


def _run_as() -> str | None:
    """The user to run PostgreSQL as, or None to stay who we are (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{log.read_text()}")
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres not ready after {timeout}s:\n{log.read_text()}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def running_postgres(timeout: float = 60.0) -> Iterator[str]:
    """Start PostgreSQL; yields a URL for a fresh database ``toile`` (user ``toile``, trust
    authentication on loopback only)."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("initdb")
    user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="toile-pg-"))
    if user is not None:
        shutil.chown(root, user=user)
    data, log, port = root / "data", root / "postgres.log", free_port()
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "toile", "--auth=trust", "-E", "UTF8",
         "--no-sync", "--no-instructions"],
        check=True, capture_output=True, user=user,
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
             "-k", str(root), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off"],
            stdout=out, stderr=subprocess.STDOUT, user=user,
        )
    try:
        _wait_ready(f"postgresql://toile@127.0.0.1:{port}/postgres", proc, log, timeout)
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "toile", "toile"], check=True, capture_output=True)
        yield f"postgresql://toile@127.0.0.1:{port}/toile"
    finally:
        proc.send_signal(2)  # SIGINT: fast shutdown
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def postgres_or_skip() -> contextlib.AbstractContextManager[str]:
    """``running_postgres()``, or a pytest skip naming why PostgreSQL cannot run here."""
    import pytest

    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'toile[serve]')")
    if pg_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in "
                    "/usr/lib/postgresql/*/bin): apt-get install postgresql")
    return running_postgres()


def fresh_database(url: str, name: str) -> str:
    """A new empty database next to ``url``'s (each test gets its own queue)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}"')
        db.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}"

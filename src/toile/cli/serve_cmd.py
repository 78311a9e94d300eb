"""``toile serve``: the HTTP server (FastAPI + uvicorn) over a durable job queue.

With ``--queue postgresql://...`` it serves the API only: the jobs run in ``toile worker``
processes sharing that queue (README "Scaling out").

Only argparse at import time; FastAPI, uvicorn and torch load when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    from toile.serve.config import default_data_dir

    p = subparsers.add_parser(
        "serve",
        help="run the HTTP server (jobs API, SSE progress, durable queue)",
        description="Serve the native job API at /v1 (OpenAPI at /openapi.json, docs at /docs). "
        "Binds 127.0.0.1 unless told otherwise; any other address needs an API token.",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 7860; 0 = any free port)")
    p.add_argument("--config", metavar="PATH", help="TOML (or .json) server config file")
    p.add_argument(
        "--api-token",
        metavar="T",
        help="require 'Authorization: Bearer T' (default: $TOILE_API_TOKEN)",
    )
    p.add_argument(
        "--data-dir",
        metavar="PATH",
        help="folder for jobs.sqlite3, images/, uploads/ (default: <toile home>/serve, "
        f"here {default_data_dir()}; <toile home> is $TOILE_HOME, else "
        "$XDG_CONFIG_HOME/toile, else ~/.config/toile)",
    )
    p.add_argument(
        "--queue",
        metavar="URL",
        help="a shared PostgreSQL job queue (postgresql://user@host/db): serve the API only, "
        "jobs run in `toile worker` processes; the data dir must be shared with them",
    )
    p.add_argument("--device", choices=("cpu", "cuda", "mps"))
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toile.serve.config import build_config

    config = build_config(
        args.config,
        host=args.host,
        port=args.port,
        api_token=args.api_token,
        data_dir=args.data_dir,
        device=args.device,
        dtype=args.dtype,
        queue=args.queue,
    )
    config.check_bind()  # before anything listens
    config.check_files()
    check_queue(config)
    try:
        import uvicorn

        from toile.serve.app import create_app
    except ModuleNotFoundError as exc:
        from toile.errors import ToileError

        raise ToileError(
            f"toile serve needs the server extras ({exc.name} is missing): "
            'pip install "toile[serve]"'
        ) from None
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    auth = "token required" if config.api_token else "no token (loopback only)"
    print(
        f"toile serve: http://{config.host}:{config.port}  data: {config.data_dir}  auth: {auth}"
        + (f"  queue: {queue_name(config)} (API only)" if config.distributed else ""),
        file=sys.stderr,
    )
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


def check_queue(config: Any) -> None:
    """Open the queue once before serving: a damaged SQLite file, or a PostgreSQL server that
    cannot be reached, is one line with advice, not a traceback (PostgreSQL's schema is also
    created or migrated here)."""
    if config.distributed:
        try:
            from toile.serve.queue_pg import PgQueue
        except ModuleNotFoundError as exc:
            from toile.errors import ToileError

            raise ToileError(f"--queue needs psycopg ({exc.name} is missing): "
                             'pip install "toile[serve]"') from None
        PgQueue(config.queue).close()
        return
    from toile.serve.store import JobStore

    JobStore(config.db_path).close()


def queue_name(config: Any) -> str:
    from toile.serve.queue_pg import redact

    return redact(config.queue) if config.queue else str(config.db_path)

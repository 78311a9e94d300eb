"""``toile worker``: run jobs from a shared PostgreSQL queue on one device (README "Scaling out").

One process per GPU: ``--device cuda:1``; ``--devices all`` (or a list, ``cuda:0,cuda:1``)
starts one child process per device and stops them together. Each worker needs the queue URL,
the data folder shared with the API processes (uploads in, images out) and the models by id
(the same ids as the API's registry, e.g. one shared ``TOILE_HOME``).

Only argparse at import time; torch loads when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
from typing import Any

STOP_TIMEOUT_S = 60.0  # a child gets this long to hand its running job back after SIGTERM


def add_parser(subparsers: Any) -> None:
    from toile.serve.config import default_data_dir

    p = subparsers.add_parser(
        "worker",
        help="run jobs from a shared PostgreSQL queue (one process per GPU)",
        description="Claim jobs from the queue `toile serve --queue` accepts them into and run "
        "them on one device (or one child process per device with --devices). Stop with "
        "SIGTERM or Ctrl-C: the running job goes back to the queue.",
    )
    p.add_argument("--queue", metavar="URL",
                   help="the shared job queue, postgresql://user@host/db (or `queue` in --config)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", metavar="D",
                       help="cpu, cuda, cuda:N or mps (default: the first GPU, else cpu)")
    where.add_argument("--devices", metavar="LIST",
                       help="'all' (one worker per visible CUDA device) or a comma list "
                       "(cuda:0,cuda:1): one child process each")
    p.add_argument("--data-dir", metavar="PATH",
                   help="the data folder shared with the API processes (uploads/, images/; "
                   f"default {default_data_dir()})")
    p.add_argument("--config", metavar="PATH",
                   help="TOML server config (the same file as the API's: loras, policy, ...)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toile.errors import ToileError
    from toile.serve.config import build_config

    config = build_config(args.config, queue=args.queue, data_dir=args.data_dir,
                          device=args.device, dtype=args.dtype)
    if not config.distributed:
        raise ToileError("toile worker needs a shared queue: --queue postgresql://user@host/db "
                         "(or queue = \"postgresql://...\" in --config)")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(levelname)s: %(name)s: %(message)s")
    if args.devices:
        return _run_children(args, _devices(args.devices))
    config.check_files()
    return _run_one(config)


def _devices(spec: str) -> list[str]:
    """``all``: every visible CUDA device (none: one CPU worker); else the comma list."""
    if spec.strip() != "all":
        return [d.strip() if not d.strip().isdigit() else f"cuda:{d.strip()}"
                for d in spec.split(",") if d.strip()]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        print("toile worker: no CUDA device visible; one worker on the CPU", file=sys.stderr)
        return ["cpu"]
    return [f"cuda:{index}" for index in range(count)]


def _child_command(args: argparse.Namespace, device: str) -> list[str]:
    command = [sys.executable, "-m", "toile.cli.main", "worker", "--device", device,
               "--log-level", args.log_level]
    for flag, value in (("--queue", args.queue), ("--data-dir", args.data_dir),
                        ("--config", args.config), ("--dtype", args.dtype)):
        if value is not None:
            command += [flag, str(value)]
    return command


def _run_children(args: argparse.Namespace, devices: list[str]) -> int:
    """One worker process per device; SIGTERM/SIGINT go to all of them; returns when every
    child has ended (the worst exit status)."""
    children = [subprocess.Popen(_child_command(args, device)) for device in devices]
    print(f"toile worker: {len(children)} workers on {', '.join(devices)}", file=sys.stderr)

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(abs(code) for code in codes)


def _run_one(config: Any) -> int:
    """The worker in this process until SIGTERM or Ctrl-C; then its running job goes back
    to the queue (a graceful stop does not count as an attempt)."""
    from toile.cli.serve_cmd import check_queue, queue_name
    from toile.serve.jobs import JobService, Role

    check_queue(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service = JobService.open(config, role=Role.WORKER)
    try:
        worker = service.worker
        assert worker is not None
        print(f"toile worker {worker.worker_id}: queue {queue_name(config)}  "
              f"data: {config.data_dir}", file=sys.stderr)
        while not stop.wait(1.0):
            if not worker.alive:
                print("toile worker: the worker thread stopped; exiting", file=sys.stderr)
                return 1
    finally:
        service.close()
    return 0

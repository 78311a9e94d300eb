"""``python -m toile.tools.api_fuzz``: generated requests against toile's own OpenAPI schema.

schemathesis (a dev dependency) turns ``/openapi.json`` into Hypothesis strategies: valid and
invalid bodies, query strings, headers and paths for every operation. Each request goes to a
real server (uvicorn on a loopback port, the built-in model, a small queue) and is judged by
three rules: no 5xx but the documented ones (503 queue full, 507 disk full), no request over
``--hang-s`` seconds, and a server that still answers ``/health`` afterwards. Seeded
(``--seed``: Hypothesis' derandomised mode), bounded (``--n`` per operation).

The two event streams (``/v1/events`` and ``/v1/jobs/{id}/events``) are left out: they are
open-ended by design (server-sent events), so a time limit would judge them wrongly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCUMENTED_5XX = frozenset({503, 507})
STREAMS = frozenset({"/v1/events", "/v1/jobs/{job_id}/events"})


@dataclass
class Tally:
    """Per operation: requests sent, answers by status class, and findings."""

    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def served(data_dir: Path) -> Iterator[str]:
    """The app under uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    from toile.engine.engine import Engine
    from toile.engine.models import ModelRegistry
    from toile.serve.app import create_app
    from toile.serve.config import ServeConfig
    from toile.serve.process import free_port

    port = free_port()
    engine = Engine(ModelRegistry(data_dir / "models.json"), device="cpu", allow_paths=False)
    config = ServeConfig(data_dir=data_dir, port=port, max_steps=2, max_images=1, max_queue=2,
                         preview_every=0, webhooks=False)
    server = uvicorn.Server(uvicorn.Config(create_app(config, engine=engine), host="127.0.0.1",
                                           port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError("the server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def fuzz(base_url: str, *, n: int, seed: int, hang_s: float) -> dict[str, Tally]:
    """``n`` generated requests per operation; returns the tally per operation."""
    import requests
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    session = requests.Session()
    tallies: dict[str, Tally] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in STREAMS:
            continue
        tallies[f"{operation.method.upper()} {operation.path}"] = tally = Tally()
        run_operation(operation, tally, base_url, session, n=n, hang_s=hang_s)
    alive = requests.get(f"{base_url}/health", timeout=hang_s)
    if alive.status_code != 200:
        tallies.setdefault("server", Tally()).findings.append(f"/health {alive.status_code}")
    return tallies


def run_operation(operation: Any, tally: Tally, base_url: str, session: Any, *, n: int,
                  hang_s: float) -> None:
    """``n`` generated cases of one operation, each judged and counted in ``tally``."""
    import requests
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def one(case: Any) -> None:
        start = time.perf_counter()
        try:
            response = case.call(base_url=base_url, session=session, timeout=hang_s * 3)
        except requests.RequestException as exc:
            tally.findings.append(f"no answer: {type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - start
        tally.requests += 1
        kind = f"{response.status_code // 100}xx"
        tally.by_status[kind] = tally.by_status.get(kind, 0) + 1
        if response.status_code >= 500 and response.status_code not in DOCUMENTED_5XX:
            tally.findings.append(f"{response.status_code}: {response.text[:200]}")
        if seconds > hang_s:
            tally.findings.append(f"took {seconds:.1f} s")

    one()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toile.tools.api_fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="requests per operation")
    parser.add_argument("--seed", type=int, default=0, help="(Hypothesis runs derandomised)")
    parser.add_argument("--hang-s", type=float, default=10.0)
    parser.add_argument("--data-dir", type=Path, help="server data folder (default: temporary)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or Path(scratch) / "data"
        with served(data_dir) as base_url:
            tallies = fuzz(base_url, n=args.n, seed=args.seed, hang_s=args.hang_s)
    total = sum(t.requests for t in tallies.values())
    findings = sum(len(t.findings) for t in tallies.values())
    if args.json:
        print(json.dumps({"requests": total, "findings": findings,
                          "operations": {k: vars(v) for k, v in tallies.items()}}, indent=2))
    else:
        for name, tally in tallies.items():
            found = len(tally.findings)
            print(f"{name:<40} {tally.requests:>6} {tally.by_status} findings={found}")
            for finding in tally.findings[:3]:
                print(f"    {finding}")
        print(f"total: {total} requests, {findings} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())

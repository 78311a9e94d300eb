"""Benchmark of the server, run side by side with the engine called directly in the same run.

    python -m toile.serve.bench --model ID [--requests 8] [--concurrency 1,4,16] ...

Starts ``toile serve`` as a subprocess on a free loopback port (its own temporary data folder),
and measures:

- **throughput and latency**: images/s and p50/p95 of submit-to-finished latency at each
  concurrency level (``--requests`` jobs per level, clients waiting on the SSE stream);
- **overhead**: the server's submit-to-finished seconds per job (one client) over the engine's
  seconds per job called directly in this process with the same request, interleaved pair by
  pair (``ratio`` > 1 = overhead), and per job the latency minus the engine's own
  ``generate_s`` from the image record (immune to load drift);
- **cancel**: time from ``POST /cancel`` to the ``cancelled`` event, and the denoising steps
  reported after the cancel was sent;
- **durability**: ``--durability-reps`` times, submit jobs from a client thread, ``kill -9``
  the server at a random moment, restart it, and check every job that got a 2xx is still there;
  at the end drain the queue and count accepted / succeeded / failed (with a reason) / lost.

Every count and wait is a parameter and every wait is bounded. Prints a summary, or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from toile.serve.client import ServeClient, ServeHTTPError
from toile.serve.process import ServerProcess
from toile.serve.spec import JobStatus


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples it is an actual sample)."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def job_fields(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": args.prompt, "model": args.model, "seed": seed}
    for name in ("steps", "width", "height"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return fields


def run_one(
    client: ServeClient, fields: dict[str, Any], timeout: float
) -> tuple[float, str, float | None]:
    """Submit and wait on the SSE stream for the end: (latency, final status, the engine's own
    generate seconds from the image record)."""
    start = time.perf_counter()
    job_id = client.submit(**fields)["id"]
    status, generate_s = "lost", None
    for kind, data in client.events(job_id, timeout=timeout):
        if kind in ("finished", "failed", "cancelled"):
            status = data.get("status", kind)
            images = data.get("images") or [{}]
            generate_s = images[0].get("record", {}).get("timings", {}).get("generate_s")
    return time.perf_counter() - start, status, generate_s


def throughput(client: ServeClient, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    count = args.requests
    latencies: list[float] = []
    statuses: list[str] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [
            pool.submit(run_one, client, job_fields(args, seed), args.job_timeout)
            for seed in range(count)
        ]
        for future in futures:
            latency, status, _ = future.result()
            latencies.append(latency)
            statuses.append(status)
    wall = time.perf_counter() - start
    ok = statuses.count(JobStatus.SUCCEEDED)
    return {
        "concurrency": concurrency,
        "requests": count,
        "succeeded": ok,
        "wall_s": round(wall, 3),
        "images_per_s": round(ok / wall, 3),
        "p50_s": round(percentile(latencies, 50), 3),
        "p95_s": round(percentile(latencies, 95), 3),
    }


def overhead(client: ServeClient, args: argparse.Namespace) -> dict[str, Any]:
    """The same request through the server (one client) and through an Engine in this process,
    interleaved pair by pair so drift (other load, heat) hits both sides alike."""
    from toile.engine.engine import Engine
    from toile.request import GenerationRequest

    engine = Engine(device=args.device, allow_paths=False)
    engine.run(GenerationRequest(**job_fields(args, 0)))  # warm-up: load and first-call costs
    server_s, direct_s, outside_engine_s = [], [], []
    for index in range(args.direct_runs):
        fields = job_fields(args, 2000 + index)
        latency, status, generate_s = run_one(client, fields, args.job_timeout)
        if status == JobStatus.SUCCEEDED:
            server_s.append(latency)
            if generate_s is not None:
                # Same job, so immune to load drift: time spent outside the engine's run.
                outside_engine_s.append(latency - generate_s)
        start = time.perf_counter()
        engine.run(GenerationRequest(**fields))
        direct_s.append(time.perf_counter() - start)
    server, direct = statistics.median(server_s), statistics.median(direct_s)
    return {
        "pairs": len(direct_s),
        "server_median_s": round(server, 4),
        "direct_median_s": round(direct, 4),
        "ratio": round(server / direct, 3),
        "server_minus_direct_s": round(server - direct, 4),
        "outside_engine_median_s": (
            round(statistics.median(outside_engine_s), 4) if outside_engine_s else None
        ),
    }


def cancel_latency(client: ServeClient, args: argparse.Namespace) -> dict[str, Any]:
    """Cancel long jobs once they report step >= 2; time to the ``cancelled`` event."""
    steps = max(50, 10 * (args.steps or 10))
    stop_s, after = [], []
    for run in range(args.cancel_runs):
        fields = {**job_fields(args, 1000 + run), "steps": steps}
        job_id = client.submit(**fields)["id"]
        sent_at, step_at_cancel, last_step = None, 0, 0
        for kind, data in client.events(job_id, timeout=args.job_timeout):
            if kind == "progress":
                last_step = data["step"]
                if sent_at is None and data["step"] >= 2:
                    step_at_cancel = data["step"]
                    sent_at = time.perf_counter()
                    client.cancel(job_id)
            elif kind == "cancelled" and sent_at is not None:
                stop_s.append(time.perf_counter() - sent_at)
                after.append(last_step - step_at_cancel)
    return {
        "runs": args.cancel_runs,
        "job_steps": steps,
        "cancelled": len(stop_s),
        "median_s": round(statistics.median(stop_s), 4) if stop_s else None,
        "max_s": round(max(stop_s), 4) if stop_s else None,
        "max_steps_reported_after_cancel": max(after) if after else None,
    }


def durability(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """kill -9 at random moments while jobs are submitted and run; nothing accepted is lost."""
    rng = random.Random(args.seed)
    data = work / "durability-data"
    accepted: list[str] = []
    reps = []
    server: ServerProcess | None = None
    port: int | None = None
    try:
        for rep in range(args.durability_reps):
            server = ServerProcess(data, port=port, log=work / "durability.log").start()
            port = server.port
            client = server.client(timeout=10)
            missing = [j for j in accepted if _status(client, j) is None]
            this_rep: list[str] = []
            stop = threading.Event()

            def submit_loop(
                client: ServeClient = client,
                out: list[str] = this_rep,
                stop: threading.Event = stop,
            ) -> None:
                for index in range(args.durability_jobs):
                    if stop.is_set():
                        return
                    try:
                        out.append(client.submit(**job_fields(args, index))["id"])
                    except (OSError, ServeHTTPError):
                        return  # the server is gone (killed): this one was not accepted
                    time.sleep(rng.uniform(0, 0.05))

            thread = threading.Thread(target=submit_loop)
            thread.start()
            time.sleep(rng.uniform(0.2, args.kill_window))
            server.kill()
            stop.set()
            thread.join(30)
            accepted.extend(this_rep)
            reps.append({"rep": rep, "accepted": len(this_rep), "missing_after_restart": missing})
        server = ServerProcess(data, port=port, log=work / "durability.log").start()
        client = server.client(timeout=10)
        final: dict[str, str] = {}
        deadline = time.monotonic() + args.drain_timeout
        for job_id in accepted:
            try:
                job = client.wait(job_id, timeout=max(1.0, deadline - time.monotonic()))
                ok = job["status"] == JobStatus.SUCCEEDED or bool(job.get("error"))
                final[job_id] = job["status"] if ok else "failed-without-reason"
            except ServeHTTPError:
                final[job_id] = "lost"
            except TimeoutError:
                final[job_id] = "unfinished"
        known = {j["id"] for j in client.jobs(limit=500)["jobs"]}
    finally:
        if server is not None:
            server.stop()
    values = list(final.values())
    return {
        "reps": reps,
        "accepted": len(accepted),
        "succeeded": values.count(JobStatus.SUCCEEDED),
        "failed_with_reason": values.count(JobStatus.FAILED),
        "cancelled": values.count(JobStatus.CANCELLED),
        "lost": values.count("lost") + values.count("failed-without-reason"),
        "unfinished_at_timeout": values.count("unfinished"),
        "stored_but_unacknowledged": len(known - set(accepted)),
    }


def _status(client: ServeClient, job_id: str) -> str | None:
    try:
        return client.job(job_id)["status"]
    except ServeHTTPError:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="toile-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "serve.toml"
    config.write_text(f"preview_every = {args.preview_every}\nmax_queue = 100000\n")
    result: dict[str, Any] = {
        "model": args.model,
        "settings": {k: getattr(args, k) for k in ("steps", "width", "height", "preview_every")},
        "work_dir": str(work),
    }
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if levels or args.cancel_runs:
        with ServerProcess(work / "data", config=config, log=work / "server.log") as server:
            client = server.client(timeout=args.job_timeout)
            run_one(client, job_fields(args, 0), args.job_timeout)  # warm-up: model load
            result["throughput"] = [throughput(client, args, c) for c in levels]
            if args.direct_runs:
                result["overhead"] = overhead(client, args)
            if args.cancel_runs:
                result["cancel"] = cancel_latency(client, args)
    if args.durability_reps:
        result["durability"] = durability(args, work)
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}  settings {result['settings']}"]
    for row in result.get("throughput", []):
        lines.append(
            f"  {row['concurrency']:>2} clients: {row['images_per_s']:.2f} images/s  "
            f"p50 {row['p50_s']:.3f}s  p95 {row['p95_s']:.3f}s  "
            f"({row['succeeded']}/{row['requests']} ok)"
        )
    if "overhead" in result:
        o = result["overhead"]
        lines.append(
            f"  overhead: server {o['server_median_s']:.3f}s/job (submit to finished event) vs "
            f"engine {o['direct_median_s']:.3f}s/job, {o['pairs']} interleaved pairs -> ratio "
            f"{o['ratio']:.2f} ({o['server_minus_direct_s']:+.3f}s); per job outside the "
            f"engine's run: {o['outside_engine_median_s']}s"
        )
    if "cancel" in result:
        c = result["cancel"]
        lines.append(
            f"  cancel: median {c['median_s']}s, max {c['max_s']}s to 'cancelled'; at most "
            f"{c['max_steps_reported_after_cancel']} step(s) reported after the cancel "
            f"({c['cancelled']}/{c['runs']} runs)"
        )
    if "durability" in result:
        d = result["durability"]
        lines.append(
            f"  durability: {len(d['reps'])} kill -9 runs, accepted {d['accepted']}, succeeded "
            f"{d['succeeded']}, failed with reason {d['failed_with_reason']}, lost {d['lost']}, "
            f"unfinished {d['unfinished_at_timeout']}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m toile.serve.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="registered model id")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), help="for the direct baseline")
    p.add_argument("--concurrency", default="1,4,16", help="client counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=16, help="jobs per concurrency level")
    p.add_argument(
        "--direct-runs", type=int, default=5, help="server/engine pairs for the overhead (0 = skip)"
    )
    p.add_argument("--cancel-runs", type=int, default=3)
    p.add_argument("--durability-reps", type=int, default=3, help="kill -9 runs (0 = skip)")
    p.add_argument("--durability-jobs", type=int, default=8, help="jobs submitted per run")
    p.add_argument("--kill-window", type=float, default=5.0, help="kill within this many s")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--job-timeout", type=float, default=600.0)
    p.add_argument("--preview-every", type=int, default=0, help="server previews (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    p.add_argument("--work-dir", help="keep data and logs here (default: a temp folder)")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("requests", "direct_runs", "cancel_runs", "durability_reps", "durability_jobs"):
        if getattr(args, name) < 0:
            print(f"--{name.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

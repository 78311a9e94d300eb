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

With ``--queue postgresql://...`` it measures the scaled-out server instead (README "Scaling
out"): one API process (``toile serve --queue``) and ``toile worker`` processes on a shared data
folder, one torch thread each (``OMP_NUM_THREADS=1``), all started here:

- **scaling**: at each ``--workers`` count (default 1,2,4; workers are added or stopped between
  counts, the API process stays), ``--requests`` jobs from ``--concurrency`` clients,
  ``--repeats`` times: jobs/s, images/s and p50/p95 latency, each as median and min-max;
- **durability**: ``--durability-reps`` rounds that ``kill -9`` a worker (one running a job, if
  any) or the API process while jobs are submitted, then restart it; at the end the same counts
  as above. The ``--lease-s`` of the queue bounds how soon a killed worker's job runs again.

Give it a database of its own: the bench's jobs stay there, and jobs it did not submit would
be run by its workers too.

Every count and wait is a parameter and every wait is bounded. Prints a summary, or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from toile.serve.process import ServerProcess, WorkerProcess
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
    latency, status, generate_s, _ = run_counted(client, fields, timeout)
    return latency, status, generate_s


def run_counted(
    client: ServeClient, fields: dict[str, Any], timeout: float
) -> tuple[float, str, float | None, int]:
    """``run_one`` plus the number of images the job made (for images/s)."""
    start = time.perf_counter()
    job_id = client.submit(**fields)["id"]
    status, generate_s, count = "lost", None, 0
    for kind, data in client.events(job_id, timeout=timeout):
        if kind in ("finished", "failed", "cancelled"):
            status = data.get("status", kind)
            count = len(data.get("images") or [])
            images = data.get("images") or [{}]
            generate_s = images[0].get("record", {}).get("timings", {}).get("generate_s")
    return time.perf_counter() - start, status, generate_s, count


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


def submit_jobs(
    client: ServeClient,
    args: argparse.Namespace,
    out: list[str],
    stop: threading.Event,
    rng: random.Random,
) -> None:
    """Submit ``--durability-jobs`` jobs a few ms apart into ``out`` (the accepted ids) until
    ``stop`` is set or the server stops answering."""
    for index in range(args.durability_jobs):
        if stop.is_set():
            return
        try:
            out.append(client.submit(**job_fields(args, index))["id"])
        except (OSError, ServeHTTPError):
            return  # the server is gone (killed): this one was not accepted
        time.sleep(rng.uniform(0, 0.05))


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
            thread = threading.Thread(target=submit_jobs, args=(client, args, this_rep, stop, rng))
            thread.start()
            time.sleep(rng.uniform(0.2, args.kill_window))
            server.kill()
            stop.set()
            thread.join(30)
            accepted.extend(this_rep)
            reps.append({"rep": rep, "accepted": len(this_rep), "missing_after_restart": missing})
        server = ServerProcess(data, port=port, log=work / "durability.log").start()
        counts = drain(server.client(timeout=10), accepted, args.drain_timeout)
    finally:
        if server is not None:
            server.stop()
    return {"reps": reps, **counts}


def drain(client: ServeClient, accepted: list[str], timeout: float) -> dict[str, int]:
    """Wait (``timeout`` in all) for every accepted job to end and count how each ended; a job
    the server no longer knows, or one that failed without saying why, counts as lost. Jobs the
    client sees that were never acknowledged (the kill came between commit and answer) are
    counted apart: they are not lost, nobody was told they exist."""
    final: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    for job_id in accepted:
        try:
            job = client.wait(job_id, timeout=max(1.0, deadline - time.monotonic()))
            ok = job["status"] == JobStatus.SUCCEEDED or bool(job.get("error"))
            final[job_id] = job["status"] if ok else "failed-without-reason"
        except ServeHTTPError:
            final[job_id] = "lost"
        except TimeoutError:
            final[job_id] = "unfinished"
    known = {j["id"] for j in client.jobs(limit=max(500, 2 * len(accepted)))["jobs"]}
    values = list(final.values())
    return {
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


# --- the shared PostgreSQL queue (--queue) --------------------------------------------------

# One client for the measured jobs, another for the kill -9 rounds: a client sees only its own
# jobs, so the rounds' count of stored-but-unacknowledged jobs leaves the measured ones out.
QUEUE_CLIENTS = {"bench": "toile-bench-throughput", "durability": "toile-bench-durability"}
SPREAD_KEYS = ("jobs_per_s", "images_per_s", "p50_s", "p95_s")


def worker_device(device: str, index: int) -> str:
    """``cuda``: worker ``index`` on GPU ``index`` mod the GPU count (one worker per GPU until
    there are more workers than GPUs); any other device as given."""
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{index % count}" if count else device


def worker_pids(url: str, where: str, params: tuple[Any, ...]) -> set[int]:
    """The process ids in ``worker_id`` (``host:pid:device:tag``, serve.worker's
    default_worker_id) of the jobs matching ``where``: which of our processes ran or runs them
    (the API does not say; the queue's table does)."""
    from toile.serve.queue_pg import connect

    with connect(url) as db:
        rows = db.execute(f"SELECT worker_id FROM jobs WHERE {where}", params).fetchall()
    parts = [str(row["worker_id"] or "").split(":") for row in rows]
    return {int(p[1]) for p in parts if len(p) > 1 and p[1].isdigit()}


def jobs_waiting(url: str) -> int:
    """Queued or running jobs in the queue: jobs the bench did not submit skew it."""
    from toile.serve.queue_pg import connect

    with connect(url) as db:
        row = db.execute("SELECT COUNT(*) AS n FROM jobs WHERE status IN (%s, %s)",
                         (JobStatus.QUEUED.value, JobStatus.RUNNING.value)).fetchone()
    return int(row["n"])


class QueueCluster:
    """One ``toile serve --queue`` process and ``toile worker`` processes on one data folder,
    all on this machine. ``warm``: the pids of workers that have run a job (model loaded)."""

    def __init__(self, args: argparse.Namespace, work: Path, config: Path) -> None:
        self.url: str = args.queue
        self.device: str = args.device or "cpu"
        self.start_timeout: float = args.start_timeout
        self.work, self.config, self.data = work, config, work / "queue-data"
        self.api = self._api(port=None)
        self.workers: list[WorkerProcess] = []
        self.warm: set[int] = set()
        self._started = 0  # workers ever started: each its own log (and GPU slot)

    def _api(self, port: int | None) -> ServerProcess:
        return ServerProcess(self.data, config=self.config, queue=self.url, port=port,
                             log=self.work / "api.log")

    def client(self, name: str, timeout: float) -> ServeClient:
        return ServeClient(self.api.url, token=QUEUE_CLIENTS[name], timeout=timeout)

    def scale_to(self, count: int) -> None:
        """Stop the newest workers (SIGTERM: they are idle between measurements) or start more."""
        while len(self.workers) > count:
            self.workers.pop().stop()
        while len(self.workers) < count:
            self.start_worker()

    def start_worker(self) -> None:
        index = self._started
        self._started += 1
        # One torch thread per worker: N workers on N cores, rather than N OpenMP pools that
        # each want every core (on a GPU the thread count hardly matters).
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        worker = WorkerProcess(self.url, self.data, device=worker_device(self.device, index),
                               config=self.config, env=env,
                               log=self.work / f"worker-{index}.log")
        self.workers.append(worker.start())

    def replace_api(self) -> None:
        """A new API process on the same port (clients keep their URL) after a kill."""
        self.api = self._api(port=self.api.port).start(self.start_timeout)

    def replace_worker(self, worker: WorkerProcess) -> None:
        self.workers.remove(worker)
        self.start_worker()

    def pids(self) -> set[int]:
        return {w.proc.pid for w in self.workers if w.proc is not None}

    def check_alive(self) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is not None:
                raise RuntimeError(f"a worker exited with {worker.proc.returncode}:\n"
                                   f"{worker.log_tail()}")

    def __enter__(self) -> QueueCluster:
        self.api.start(self.start_timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.stop()
        self.api.stop()


def warm_up(cluster: QueueCluster, args: argparse.Namespace) -> None:
    """Run jobs until every worker has run one: a worker's first job loads the model, a
    start-up cost and not throughput. An idle worker takes whichever job comes, so a worker
    still starting may get none in a round; the rounds repeat until each had one."""
    client = cluster.client("bench", args.job_timeout)
    deadline = time.monotonic() + args.start_timeout
    seed = 3000
    while waiting := cluster.pids() - cluster.warm:
        cluster.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} worker(s) ran no job in {args.start_timeout}s; "
                               f"logs in {cluster.work}")
        ids = [client.submit(**job_fields(args, seed + i))["id"] for i in range(len(waiting))]
        seed += len(ids)
        for job_id in ids:
            job = client.wait(job_id, timeout=max(1.0, deadline - time.monotonic()))
            if job["status"] != JobStatus.SUCCEEDED:
                raise RuntimeError(f"warm-up job {job['status']}: {job.get('error')}")
        cluster.warm |= worker_pids(cluster.url, "id = ANY(%s)", (ids,)) & waiting
        if cluster.pids() - cluster.warm:
            time.sleep(0.5)  # a worker is still starting: don't pile up jobs meanwhile


def queue_throughput(
    client: ServeClient, args: argparse.Namespace, concurrency: int
) -> dict[str, Any]:
    """``--requests`` jobs from ``concurrency`` client threads, each waiting on its job's SSE
    stream (through the API process, from the worker via PostgreSQL)."""
    latencies: list[float] = []
    ok = images = 0
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [
            pool.submit(run_counted, client, job_fields(args, seed), args.job_timeout)
            for seed in range(args.requests)
        ]
        for future in futures:
            latency, status, _, count = future.result()
            latencies.append(latency)
            if status == JobStatus.SUCCEEDED:
                ok, images = ok + 1, images + count
    wall = time.perf_counter() - start
    return {
        "succeeded": ok,
        "wall_s": round(wall, 3),
        "jobs_per_s": round(ok / wall, 3),
        "images_per_s": round(images / wall, 3),
        "p50_s": round(percentile(latencies, 50), 3),
        "p95_s": round(percentile(latencies, 95), 3),
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": min(values),
            "max": max(values)}


def scaling(
    cluster: QueueCluster, args: argparse.Namespace, counts: list[int], concurrency: int
) -> list[dict[str, Any]]:
    """Each worker count in turn (the API process and warm workers stay), ``--repeats`` runs
    each; ``speedup`` is the median jobs/s over the first count's."""
    rows: list[dict[str, Any]] = []
    for count in counts:
        cluster.scale_to(count)
        warm_up(cluster, args)
        client = cluster.client("bench", args.job_timeout)
        runs = [queue_throughput(client, args, concurrency) for _ in range(args.repeats)]
        rows.append({"workers": count, "requests": args.requests, "runs": runs,
                     **{key: spread([run[key] for run in runs]) for key in SPREAD_KEYS}})
    base = rows[0]["jobs_per_s"]["median"] if rows else 0
    for row in rows:
        row["speedup"] = round(row["jobs_per_s"]["median"] / base, 3) if base else None
    return rows


def kill_a_worker(
    cluster: QueueCluster, rng: random.Random, patience: float
) -> tuple[WorkerProcess, bool]:
    """``kill -9`` a random worker among those running a job, waiting up to ``patience`` s for
    one to be (short jobs are often over by the random moment, and a killed idle worker tests
    nothing: the case that matters is a lease that must expire and the job run elsewhere); else
    any worker. Returns it and whether it held a job."""
    deadline = time.monotonic() + patience
    while True:
        busy = worker_pids(cluster.url, "status = %s", (JobStatus.RUNNING.value,))
        holding = [w for w in cluster.workers if w.proc is not None and w.proc.pid in busy]
        if holding or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    victim = rng.choice(holding or cluster.workers)
    victim.kill()
    return victim, bool(holding)


def queue_durability(cluster: QueueCluster, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of jobs submitted while a process is killed with ``kill -9`` and restarted: even
    rounds a worker, odd rounds the API process, so two rounds or more cover both."""
    rng = random.Random(args.seed)
    client = cluster.client("durability", timeout=10)
    accepted: list[str] = []
    reps = []
    for rep in range(args.durability_reps):
        this_rep: list[str] = []
        stop = threading.Event()
        thread = threading.Thread(target=submit_jobs, args=(client, args, this_rep, stop, rng))
        thread.start()
        time.sleep(rng.uniform(0.2, args.kill_window))
        victim: WorkerProcess | None = None
        held_a_job = False
        if rep % 2 == 0:
            victim, held_a_job = kill_a_worker(cluster, rng, args.kill_window)
        else:
            cluster.api.kill()
        stop.set()
        thread.join(30)
        accepted.extend(this_rep)
        if victim is None:
            cluster.replace_api()
        else:
            cluster.replace_worker(victim)
        missing = [j for j in accepted if _status(client, j) is None]
        reps.append({"rep": rep, "killed": "api" if victim is None else "worker",
                     "victim_held_a_job": held_a_job, "accepted": len(this_rep),
                     "missing_after_restart": missing})
    counts = drain(client, accepted, args.drain_timeout)
    return {"workers": len(cluster.workers), "lease_s": args.lease_s, "reps": reps, **counts}


def run_queue(args: argparse.Namespace, work: Path, config: Path) -> dict[str, Any]:
    from toile.serve.queue_pg import redact

    counts = worker_counts(args.workers)
    concurrency = queue_concurrency(args.concurrency, counts)
    settings: dict[str, Any] = {
        "url": redact(args.queue), "device": args.device or "cpu", "threads_per_worker": 1,
        "clients": concurrency, "requests": args.requests, "repeats": args.repeats,
    }
    result: dict[str, Any] = {"queue": settings}
    with QueueCluster(args, work, config) as cluster:
        settings["jobs_waiting_at_start"] = jobs_waiting(args.queue)
        if args.requests:
            result["scaling"] = scaling(cluster, args, counts, concurrency)
        if args.durability_reps:
            cluster.scale_to(max(counts))
            warm_up(cluster, args)  # else the first rounds kill workers still starting up
            result["durability"] = queue_durability(cluster, args)
    return result


def worker_counts(text: str) -> list[int]:
    counts = [int(c) for c in text.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"--workers: a comma list of counts >= 1, got {text!r}")
    return counts


def queue_concurrency(text: str | None, counts: list[int]) -> int:
    """One client count in queue mode; by default two per worker at the largest count, so
    every worker always has a job waiting for it."""
    if text is None:
        return 2 * max(counts)
    levels = [int(c) for c in text.split(",") if c.strip()]
    if len(levels) != 1 or levels[0] < 1:
        raise ValueError(f"--concurrency with --queue: one client count >= 1, got {text!r}")
    return levels[0]


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
    if args.queue:
        clients = "".join(f'{name} = "{token}"\n' for name, token in QUEUE_CLIENTS.items())
        with config.open("a") as out:
            out.write(f"lease_s = {args.lease_s}\n[clients]\n{clients}")
        return {**result, **run_queue(args, work, config)}
    levels = [int(c) for c in (args.concurrency or "1,4,16").split(",") if c.strip()]
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
    if "queue" in result:
        lines += queue_summary(result)
    if "durability" in result:
        d = result["durability"]
        lines.append(
            f"  durability: {len(d['reps'])} kill -9 runs, accepted {d['accepted']}, succeeded "
            f"{d['succeeded']}, failed with reason {d['failed_with_reason']}, lost {d['lost']}, "
            f"unfinished {d['unfinished_at_timeout']}"
        )
        if "workers" in d:  # queue mode: what was killed
            killed = [r["killed"] for r in d["reps"]]
            held = sum(r["victim_held_a_job"] for r in d["reps"])
            lines[-1] += (f" ({d['workers']} workers, lease {d['lease_s']}s; killed: worker "
                          f"{killed.count('worker')} ({held} mid-job), api {killed.count('api')})")
    return "\n".join(lines)


def queue_summary(result: dict[str, Any]) -> list[str]:
    """One line per worker count: medians, then (min-max) over the repeats."""
    q = result["queue"]
    lines = [
        f"queue {q['url']}  device {q['device']}, {q['threads_per_worker']} torch thread per "
        f"worker, {q['clients']} clients, {q['requests']} jobs x {q['repeats']} repeats"
        + (f"  (!) {q['jobs_waiting_at_start']} jobs already waiting"
           if q["jobs_waiting_at_start"] else "")
    ]

    def cell(row: dict[str, Any], key: str, unit: str) -> str:
        s = row[key]
        return f"{s['median']:.3f}{unit} ({s['min']:.3f}-{s['max']:.3f})"

    for row in result.get("scaling", []):
        ok = sum(r["succeeded"] for r in row["runs"])
        lines.append(
            f"  {row['workers']:>2} workers: {cell(row, 'jobs_per_s', ' jobs/s')}  "
            f"{cell(row, 'images_per_s', ' images/s')}  p50 {cell(row, 'p50_s', 's')}  "
            f"p95 {cell(row, 'p95_s', 's')}  x{row['speedup']:.2f}  "
            f"({ok}/{row['requests'] * len(row['runs'])} ok)"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m toile.serve.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="registered model id")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "mps"),
        help="for the direct baseline; with --queue the workers' (default cpu; cuda: worker i "
        "on GPU i mod the GPU count)",
    )
    p.add_argument(
        "--concurrency",
        help="client counts (default 1,4,16); with --queue one count (default 2 per worker at "
        "the largest --workers)",
    )
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
    q = p.add_argument_group("scaled out (README 'Scaling out')")
    q.add_argument(
        "--queue",
        metavar="URL",
        help="postgresql://user@host/db (a database of its own): an API process and "
        "`toile worker`s instead of one server; overhead and cancel are not measured",
    )
    q.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    q.add_argument("--repeats", type=int, default=3, help="runs per worker count (default 3)")
    q.add_argument(
        "--lease-s", type=float, default=5.0, help="the queue's lease: a killed worker's job "
        "runs again after this (default 5)"
    )
    q.add_argument(
        "--start-timeout", type=float, default=300.0,
        help="for processes to start and every worker to load the model",
    )
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("requests", "direct_runs", "cancel_runs", "durability_reps", "durability_jobs"):
        if getattr(args, name) < 0:
            print(f"--{name.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    if args.queue:
        try:
            queue_concurrency(args.concurrency, worker_counts(args.workers))
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        if args.repeats < 1 or not 1 <= args.lease_s <= 3600:
            print("--repeats must be >= 1 and --lease-s in [1, 3600]", file=sys.stderr)
            return 2
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

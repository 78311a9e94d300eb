"""Scaling out, with the real thing: PostgreSQL (started here on loopback), one API process
(``toile serve --queue``) and two ``toile worker`` processes on the CPU, the tiny SD model by id
in a shared toile home. Jobs from three clients complete exactly once and fairly; SSE progress
of a job on a worker reaches the API's client; a cancel reaches the worker; ``kill -9`` of a
worker or of the API process loses no accepted job. Skipped (with the reason) where PostgreSQL
is not installed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pg_helpers import postgres_or_skip
from serve_helpers import MODEL

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKENS = {"alice": "alice-token-1234", "bob": "bob-token-12345", "carol": "carol-token-1234"}
LONG_STEPS = 150  # a job long enough to act on while it runs (~10 ms a step here)


class Cluster:
    def __init__(self, url: str, root: Path, env: dict[str, str]) -> None:
        from toile.serve.process import ServerProcess

        self.url, self.root, self.env = url, root, env
        self.data = root / "data"
        self.config = root / "serve.toml"
        clients = "\n".join(f'{name} = "{token}"' for name, token in TOKENS.items())
        self.config.write_text(f"lease_s = 2\nmax_steps = 200\n[clients]\n{clients}\n")
        self.api = ServerProcess(self.data, config=self.config, queue=url, env=env,
                                 log=root / "api.log")
        self.workers: list = []

    def start_worker(self) -> None:
        from toile.serve.process import WorkerProcess

        index = len(self.workers)
        self.workers.append(WorkerProcess(self.url, self.data, config=self.config, env=self.env,
                                          log=self.root / f"worker{index}.log").start())

    def client(self, name: str):
        from toile.serve.client import ServeClient

        return ServeClient(self.api.url, token=TOKENS[name], timeout=30)

    def logs(self) -> str:
        parts = [self.api.log_tail(1500)] + [w.log_tail(1500) for w in self.workers]
        return "\n---\n".join(parts)

    def row(self, job_id: str) -> dict:
        return self._query("SELECT * FROM jobs WHERE id = %s", job_id)

    def live_workers(self) -> int:
        return self._query("SELECT COUNT(*) AS n FROM workers WHERE seen_at > "
                           "EXTRACT(EPOCH FROM clock_timestamp()) - 10")["n"]

    def _query(self, sql: str, *args: object) -> dict:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.url, row_factory=dict_row) as db:
            return db.execute(sql, args).fetchone()


@pytest.fixture(scope="module")
def cluster(tiny_models, tmp_path_factory):
    from toile.engine.models import ModelRegistry

    root = tmp_path_factory.mktemp("scale")
    home = root / "home"
    ModelRegistry(home / "models.json").add(MODEL, tiny_models("sd"))
    env = dict(os.environ, TOILE_HOME=str(home))
    with postgres_or_skip() as url:
        cluster = Cluster(url, root, env)
        cluster.api.start()
        try:
            for _ in range(2):
                cluster.start_worker()
            yield cluster
        finally:
            for worker in cluster.workers:
                worker.stop()
            cluster.api.stop()


def wait_for(check, timeout: float, what: str, logs=lambda: ""):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
        time.sleep(0.05)
    return value


def running_step(client, job_id: str) -> int:
    job = client.job(job_id)
    return (job.get("progress") or {}).get("step") or 0 if job["status"] == "running" else 0


def test_jobs_from_three_clients_complete_exactly_once_and_fairly(cluster):
    alice, bob, carol = (cluster.client(name) for name in TOKENS)
    wait_for(lambda: alice.health()["worker_alive"], 120, "a worker", cluster.logs)
    wait_for(lambda: cluster.live_workers() == 2, 120, "both workers", cluster.logs)
    submitted = {"alice": [], "bob": [], "carol": []}
    for i in range(30):
        submitted["alice"].append(alice.submit(prompt=f"a{i}", model=MODEL, steps=2, seed=i)["id"])
    submitted["bob"].append(bob.submit(prompt="b", model=MODEL, steps=2, seed=1)["id"])
    for i in range(9):
        submitted["carol"].append(carol.submit(prompt=f"c{i}", model=MODEL, steps=2, seed=i)["id"])
    clients = {"alice": alice, "bob": bob, "carol": carol}
    jobs = {job_id: clients[name].wait(job_id, timeout=180)
            for name, ids in submitted.items() for job_id in ids}
    assert len(jobs) == 40
    for job in jobs.values():
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert job["attempts"] == 1 and len(job["images"]) == 1
    # Exactly once: one image row per job, and no other result file on the shared disk.
    files = {p.name for p in (cluster.data / "images").iterdir() if p.suffix == ".png"}
    assert files == {f"{job['images'][0]['id']}.png" for job in jobs.values()}

    # Fairness: bob's one job, queued behind alice's 30, starts within two job slots.
    rows = {job_id: cluster.row(job_id) for job_id in jobs}
    mine = rows[submitted["bob"][0]]
    ahead = [r for r in rows.values() if r["owner"] == "alice"
             and mine["created_at"] < r["started_at"] < mine["started_at"]]
    assert len(ahead) <= 2, [r["id"] for r in ahead]
    assert len({r["worker_id"] for r in rows.values()}) == 2  # both workers took jobs


def test_sse_progress_from_a_worker_and_cancel_within_a_step(cluster):
    bob = cluster.client("bob")
    job = bob.submit(prompt="long", model=MODEL, steps=LONG_STEPS, seed=3)
    steps, cancelled_at = [], None
    for kind, data in bob.events(job["id"], timeout=120):
        if kind == "progress":
            steps.append(data["step"])
            if cancelled_at is None and data["step"] >= 3:
                bob.cancel(job["id"])
                cancelled_at = data["step"]
        if kind in ("finished", "failed", "cancelled"):
            break
    assert kind == "cancelled", (kind, cluster.logs())
    assert steps[:3] == [1, 2, 3]  # progress published by the worker, streamed by the API
    # The cancel went API -> PostgreSQL NOTIFY -> the worker: it stopped within a few steps
    # of the client's decision (one step, plus events already on their way).
    assert cancelled_at is not None and steps[-1] - cancelled_at <= 4, steps
    assert bob.job(job["id"])["status"] == "cancelled"


def test_kill_9_of_a_worker_mid_job_finishes_on_the_other(cluster):
    carol = cluster.client("carol")
    job = carol.submit(prompt="survivor", model=MODEL, steps=LONG_STEPS, seed=4)
    wait_for(lambda: running_step(carol, job["id"]) >= 2, 60, "progress", cluster.logs)
    holder = cluster.row(job["id"])["worker_id"]
    (victim,) = [w for w in cluster.workers if f":{w.proc.pid}:" in holder]
    victim.kill()  # no clean-up runs: the lease just stops being renewed
    done = carol.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", (done, cluster.logs())
    assert done["attempts"] == 2 and len(done["images"]) == 1
    assert cluster.row(job["id"])["worker_id"] != holder
    cluster.workers.remove(victim)
    cluster.start_worker()


def test_kill_9_of_the_api_process_loses_no_accepted_job(cluster):
    from toile.serve.process import ServerProcess

    alice = cluster.client("alice")
    accepted = [alice.submit(prompt=f"k{i}", model=MODEL, steps=2, seed=i)["id"]
                for i in range(5)]
    cluster.api.kill()
    cluster.api = ServerProcess(cluster.data, config=cluster.config, queue=cluster.url,
                                env=cluster.env, port=cluster.api.port,
                                log=cluster.root / "api.log").start()
    alice = cluster.client("alice")
    for job_id in accepted:
        done = alice.wait(job_id, timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 1, (done, cluster.logs())


def test_a_client_over_its_queued_limit_gets_429(tiny_models, tmp_path):
    """The per-client limit, in the embedded server (SQLite): the same check as PostgreSQL's
    (the queue contract tests both)."""
    from serve_helpers import ScriptedEngine, serve, tiny_engine

    scripted = ScriptedEngine(tiny_engine(tiny_models("sd"), tmp_path))
    scripted.gate_at = 1
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
    body = {"prompt": "x", "model": MODEL, "steps": 2}
    with serve(scripted, tmp_path / "data", clients=TOKENS, max_queued_per_client=1) as client:
        try:
            assert client.post("/v1/jobs", json=body, headers=headers).status_code == 202
            scripted.reached.wait(30)  # the first runs, so the next one waits in the queue
            assert client.post("/v1/jobs", json=body, headers=headers).status_code == 202
            refused = client.post("/v1/jobs", json=body, headers=headers)
            assert refused.status_code == 429
            assert "max_queued_per_client" in refused.json()["error"]["message"]
            other = {"Authorization": f"Bearer {TOKENS['bob']}"}
            assert client.post("/v1/jobs", json=body, headers=other).status_code == 202
        finally:
            scripted.release()


def test_the_worker_command_needs_a_shared_queue(capsys):
    from toile.cli.main import build_parser, main
    from toile.cli.worker_cmd import _child_command, _devices

    assert main(["worker", "--data-dir", "unused"]) == 2
    assert "--queue postgresql://" in capsys.readouterr().err
    assert _devices("cuda:0, 1") == ["cuda:0", "cuda:1"]
    args = build_parser().parse_args(["worker", "--queue", "postgresql://h/db", "--devices",
                                      "all", "--data-dir", "/mnt/toile"])
    child = _child_command(args, "cuda:1")  # what --devices starts per device
    assert child[child.index("--device") + 1] == "cuda:1" and "--devices" not in child
    assert child[child.index("--queue") + 1] == "postgresql://h/db" and "/mnt/toile" in child
    with pytest.raises(SystemExit):  # one device or several, not both
        main(["worker", "--device", "cpu", "--devices", "all"])

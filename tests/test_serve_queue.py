"""The job queue's contract, run against both implementations: SQLite (the embedded default)
and PostgreSQL (started here on loopback; skipped with the reason where it is not installed).
Submit, claim with a lease, heartbeat, finish, cancel, lease expiry, attempts, fairness and the
per-client limit."""

from __future__ import annotations

import itertools
import time

import pytest

from pg_helpers import fresh_database, postgres_or_skip
from toile.serve.rows import ClientQueueFullError, ImageRow, QueueFullError
from toile.serve.spec import JobSpec, JobStatus

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = JobStatus
_names = itertools.count()


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_or_skip() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request, tmp_path):
    if request.param == "sqlite":
        from toile.serve.store import JobStore

        store = JobStore(tmp_path / "jobs.sqlite3")
    else:
        from toile.serve.queue_pg import PgQueue

        url = request.getfixturevalue("postgres_url")
        store = PgQueue(fresh_database(url, f"contract{next(_names)}"))
    yield store
    store.close()


def spec(prompt: str = "x", model: str = "tiny-sd") -> JobSpec:
    return JobSpec(prompt=prompt, model=model, seed=1)


def job_id(name: str) -> str:
    return (name * 32)[:32]


def submit(queue, name: str, owner: str = "", model: str = "tiny-sd", **kw):
    row, created = queue.insert(job_id(name), spec(name, model), body_hash=name, owner=owner,
                                **kw)
    assert created
    return row


def test_submit_claim_finish(queue):
    a = submit(queue, "a")
    b = submit(queue, "b")
    assert queue.queue_position(a) == 1 and queue.queue_position(b) == 2
    claimed = queue.claim_next("w1", lease_s=30)
    assert claimed.id == a.id and claimed.status is RUNNING and claimed.attempts == 1
    assert claimed.worker_id == "w1" and claimed.lease_until > time.time() + 20
    image = ImageRow(job_id("c"), a.id, 0, "c.png", {"seed": 1})
    done = queue.finish(a.id, SUCCEEDED, images=[image], worker_id="w1")
    assert done.status is SUCCEEDED and done.images == (image,)
    assert queue.image(image.id) == image
    assert queue.finish(a.id, FAILED, worker_id="w1") is None  # once only
    assert queue.counts()[QUEUED] == 1 and queue.counts()[SUCCEEDED] == 1
    assert [job.id for job in queue.list()] == [a.id, b.id]
    assert [job.id for job in queue.list([QUEUED])] == [b.id]


def test_idempotency_key(queue):
    first, created = queue.insert(job_id("a"), spec(), body_hash="h", idempotency_key="k")
    again, created_again = queue.insert(job_id("b"), spec(), body_hash="h", idempotency_key="k")
    assert created and not created_again and again.id == first.id
    assert queue.get_by_key("k").id == first.id


def test_cancel_queued_and_running(queue):
    submit(queue, "a")
    submit(queue, "b")
    running = queue.claim_next("w1")
    job, moved = queue.cancel(job_id("b"))
    assert moved and job.status is CANCELLED
    job, moved = queue.cancel(running.id)
    assert not moved and job.status is RUNNING and job.cancel_requested
    beat = queue.heartbeat(running.id, "w1")
    assert beat.held and beat.cancel_requested  # the worker learns it at its next heartbeat
    assert queue.finish(running.id, CANCELLED, worker_id="w1").status is CANCELLED
    assert queue.claim_next("w1") is None


def test_a_lost_lease_returns_the_job_and_counts_the_attempt(queue):
    a = submit(queue, "a")
    assert queue.claim_next("dead", lease_s=0.2).attempts == 1
    assert queue.expire_leases(max_attempts=3) == []  # lease still valid: nothing moves
    assert queue.get(a.id).status is RUNNING
    time.sleep(0.4)
    assert queue.expire_leases(max_attempts=3) == []  # re-queued (not ended)
    assert queue.get(a.id).status is QUEUED
    again = queue.claim_next("alive", lease_s=30)
    assert again.id == a.id and again.attempts == 2
    # The dead worker comes back: it holds nothing, so it can neither renew nor finish.
    assert not queue.heartbeat(a.id, "dead").held
    assert queue.finish(a.id, SUCCEEDED, worker_id="dead") is None
    assert queue.get(a.id).status is RUNNING
    assert queue.finish(a.id, SUCCEEDED, worker_id="alive").status is SUCCEEDED


def test_heartbeats_keep_the_lease(queue):
    a = submit(queue, "a")
    queue.claim_next("w1", lease_s=0.5)
    for _ in range(4):
        time.sleep(0.2)
        assert queue.heartbeat(a.id, "w1", lease_s=0.5).held
        assert queue.expire_leases(max_attempts=3) == []
    assert queue.get(a.id).status is RUNNING


def test_attempts_limit_and_cancel_of_a_dead_workers_job(queue):
    a = submit(queue, "a")
    b = submit(queue, "b")
    for _ in range(2):
        queue.claim_next("dead", lease_s=0.1)
        queue.claim_next("dead", lease_s=0.1)
        time.sleep(0.2)
        queue.expire_leases(max_attempts=3)
    queue.claim_next("dead", lease_s=0.1)  # a's third attempt
    queue.claim_next("dead", lease_s=0.1)  # b's
    queue.cancel(b.id)
    time.sleep(0.2)
    ended = {job.id: job for job in queue.expire_leases(max_attempts=3)}
    assert ended[a.id].status is FAILED and "3 times (limit 3)" in ended[a.id].error
    assert ended[b.id].status is CANCELLED


def test_requeue_on_shutdown_does_not_count(queue):
    a = submit(queue, "a")
    queue.claim_next("w1")
    queue.requeue(a.id, "other")  # not its job: nothing happens
    assert queue.get(a.id).status is RUNNING
    queue.requeue(a.id, "w1")
    job = queue.get(a.id)
    assert job.status is QUEUED and job.attempts == 0 and job.worker_id is None


def test_round_robin_across_clients(queue):
    for i in range(5):
        submit(queue, f"a{i}", owner="alice")
    submit(queue, "b0", owner="bob")
    submit(queue, "b1", owner="bob")
    late = submit(queue, "c0", owner="carol")
    assert queue.queue_position(late) == 3  # alice's first, bob's first, then carol's
    order = [queue.claim_next("w").owner for _ in range(7)]
    assert order == ["alice", "bob", "carol", "alice", "bob", "alice", "alice"]


def test_one_job_behind_thirty_starts_within_two_slots(queue):
    for i in range(30):
        submit(queue, f"a{i:02}", owner="alice")
    queue.claim_next("w")
    queue.claim_next("w")
    mine = submit(queue, "bob", owner="bob")
    assert queue.queue_position(mine) == 1
    assert queue.claim_next("w").id == mine.id


def test_affinity_within_a_client_never_takes_another_clients_turn(queue):
    submit(queue, "a0", owner="alice", model="big")
    submit(queue, "a1", owner="alice", model="small")
    submit(queue, "b0", owner="bob", model="big")
    first = queue.claim_next("w", prefer_models=["small"])
    assert first.id == job_id("a1")  # alice's turn; her job on the held model
    assert queue.claim_next("w", prefer_models=["small"]).owner == "bob"  # then bob's turn


def test_affinity_passes_a_job_over_a_bounded_number_of_times(queue):
    submit(queue, "head", model="big")
    for i in range(6):
        submit(queue, f"s{i}", model="small")
    claimed = [queue.claim_next("w", prefer_models=["small"]).id for _ in range(4)]
    assert claimed[:3] == [job_id(f"s{i}") for i in range(3)]
    assert claimed[3] == job_id("head")  # passed over three times: its turn now


def test_limits(queue):
    submit(queue, "a", owner="alice", max_per_client=2)
    submit(queue, "b", owner="alice", max_per_client=2)
    with pytest.raises(ClientQueueFullError) as info:
        submit(queue, "c", owner="alice", max_per_client=2)
    assert "max_queued_per_client" in str(info.value) and "2" in str(info.value)
    submit(queue, "d", owner="bob", max_per_client=2)  # another client is not limited by it
    with pytest.raises(QueueFullError):
        submit(queue, "e", owner="carol", max_queue=3)


def test_workers_are_seen(queue):
    assert queue.live_workers(60) == 0
    queue.touch_worker("w1", "cpu", ["tiny-sd"])
    queue.touch_worker("w1", "cpu", [])
    assert queue.live_workers(60) == 1


def test_postgres_schema_is_versioned(postgres_url):
    from toile.serve.queue_pg import SCHEMA_VERSION, PgQueue

    url = fresh_database(postgres_url, "schema")
    first = PgQueue(url)
    second = PgQueue(url)  # a second process: nothing to migrate, same version
    assert first.schema_version() == second.schema_version() == SCHEMA_VERSION
    first.close()
    second.close()


def test_postgres_claims_from_many_threads_take_each_job_once(postgres_url):
    from concurrent.futures import ThreadPoolExecutor

    from toile.serve.queue_pg import PgQueue

    url = fresh_database(postgres_url, "concurrent")
    queues = [PgQueue(url) for _ in range(4)]
    for i in range(40):
        queues[0].insert(job_id(f"{i:02}"), spec(str(i)), body_hash=str(i), owner=f"c{i % 3}")

    def drain(queue) -> list[str]:
        taken = []
        while (job := queue.claim_next(f"w{id(queue)}")) is not None:
            taken.append(job.id)
        return taken

    with ThreadPoolExecutor(4) as pool:
        taken = [job for part in pool.map(drain, queues) for job in part]
    assert len(taken) == 40 and len(set(taken)) == 40
    for queue in queues:
        queue.close()

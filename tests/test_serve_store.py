"""The durable queue, the config and the small pure helpers of the server (no model needed)."""

from __future__ import annotations

import pytest

from toile.errors import RequestError
from toile.serve.spec import JobSpec, JobStatus
from toile.serve.store import IdempotencyConflict, ImageRow, JobStore, QueueFullError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = JobStatus


def spec(prompt: str = "x") -> JobSpec:
    return JobSpec(prompt=prompt, model="tiny-sd", seed=1)


def test_sqlite_is_wal_with_full_sync(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    store.close()


def test_queue_order_claim_finish_and_positions(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    a, _ = store.insert("a" * 32, spec("a"), body_hash="1")
    b, _ = store.insert("b" * 32, spec("b"), body_hash="2")
    assert store.queue_position(a) == 1 and store.queue_position(b) == 2
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == a.id
    assert claimed.status == RUNNING and claimed.attempts == 1
    assert store.queue_position(store.get(b.id)) == 1
    image = ImageRow("c" * 32, a.id, 0, "c.png", {"seed": 1})
    done = store.finish(a.id, SUCCEEDED, images=[image])
    assert done.status == SUCCEEDED and done.images == (image,)
    assert store.image("c" * 32) == image
    assert store.counts()[QUEUED] == 1
    with pytest.raises(QueueFullError):
        store.insert("d" * 32, spec(), body_hash="3", max_queue=1)
    store.close()


def test_idempotency_in_the_store(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    first, created = store.insert("a" * 32, spec(), body_hash="h", idempotency_key="k")
    again, created_again = store.insert("b" * 32, spec(), body_hash="h", idempotency_key="k")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.insert("c" * 32, spec(), body_hash="other", idempotency_key="k")
    store.close()


def test_recover_requeues_running_jobs_and_gives_up_after_max_attempts(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    for name in "abc":
        store.insert(name * 32, spec(name), body_hash=name)
    for _ in range(3):
        store.claim_next()
    store.cancel("c" * 32)  # running: cancel requested, then the server dies
    store.close()  # (a kill -9 leaves the same rows: every change was committed)

    store = JobStore(path)
    requeued, failed = store.recover(max_attempts=2)
    assert requeued == ["a" * 32, "b" * 32] and failed == []
    assert store.get("c" * 32).status == CANCELLED
    assert store.claim_next().attempts == 2  # a again: second attempt
    requeued, failed = store.recover(max_attempts=2)
    assert failed == ["a" * 32]
    job = store.get("a" * 32)
    assert job.status == FAILED and "2 times" in job.error
    assert store.get("b" * 32).status == QUEUED
    store.close()


def test_cancel_queued_moves_it_once(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.insert("a" * 32, spec(), body_hash="h")
    job, moved = store.cancel("a" * 32)
    assert moved and job.status == CANCELLED and job.finished_at is not None
    job, moved = store.cancel("a" * 32)
    assert not moved and store.claim_next() is None
    store.close()


def test_config_file_loras_and_checks(tmp_path):
    from toile.serve.config import ServeConfig, build_config

    (tmp_path / "style.safetensors").write_bytes(b"")
    path = tmp_path / "serve.toml"
    path.write_text('data_dir = "data"\nmax_steps = 30\n[loras]\nstyle = "style.safetensors"\n')
    config = build_config(path, env={"TOILE_API_TOKEN": "from-the-env"}, port=9000)
    assert config.data_dir == tmp_path / "data" and config.max_steps == 30
    assert config.loras["style"] == tmp_path / "style.safetensors"
    assert config.api_token == "from-the-env" and config.port == 9000
    config.check_files()
    path.write_text("max_stpes = 3\n")
    with pytest.raises(RequestError) as info:
        build_config(path, env={})
    assert info.value.field == "max_stpes"
    with pytest.raises(RequestError) as info:
        ServeConfig(loras={"x": "x.ckpt"})
    assert info.value.field == "loras.x"
    with pytest.raises(RequestError):
        ServeConfig(loras={"x": tmp_path / "missing.safetensors"}).check_files()
    with pytest.raises(RequestError) as info:
        ServeConfig(api_token="short")
    assert info.value.field == "api_token"


def test_field_names_from_pydantic_locations():
    from toile.serve.app import field_from_loc

    assert field_from_loc(("body", "steps")) == "steps"
    assert field_from_loc(("body", "loras", 0, "scale")) == "loras[0].scale"
    assert field_from_loc(("query", "limit")) == "limit"
    assert field_from_loc(("body",)) == "body"


def test_same_origin_rules():
    from toile.serve.auth import SecurityMiddleware
    from toile.serve.config import ServeConfig

    middleware = SecurityMiddleware(None, ServeConfig(allowed_origins=("https://ui.example",)))
    same = middleware._same_origin
    assert same("http://127.0.0.1:7860", "http", "127.0.0.1", "7860")
    assert same("https://toile.example", "http", "toile.example", None)  # TLS at a proxy
    assert same("https://ui.example", "http", "127.0.0.1", "7860")
    assert not same("http://127.0.0.1:9999", "http", "127.0.0.1", "7860")
    assert not same("null", "http", "127.0.0.1", "7860")
    assert not same("http://evil.example", "http", "127.0.0.1", "7860")


def test_importing_the_server_does_no_work():
    import subprocess
    import sys

    code = (
        "import sys, toile.serve.app, toile.cli.serve_cmd; "
        "print(any(m.startswith(('torch', 'diffusers')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

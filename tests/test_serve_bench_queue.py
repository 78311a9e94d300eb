"""The benchmark's scaled-out mode (``python -m toile.serve.bench --queue``) with the real
processes: PostgreSQL on loopback, one API process, workers added between counts, ``kill -9``
of a worker and of the API process. Tiny settings; the JSON's shape and the job counts are
checked, never a speed. Skipped (with the reason) where PostgreSQL or psycopg is not
installed."""

from __future__ import annotations

import json

import pytest

from pg_helpers import postgres_or_skip
from serve_helpers import MODEL

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SPREAD = ("jobs_per_s", "images_per_s", "p50_s", "p95_s")


def test_queue_mode_reports_each_worker_count_and_loses_no_job(
    tiny_models, tmp_path, monkeypatch, capsys
):
    from toile.engine.models import ModelRegistry
    from toile.serve.bench import main, summary

    home = tmp_path / "home"
    ModelRegistry(home / "models.json").add(MODEL, tiny_models("sd"))
    monkeypatch.setenv("TOILE_HOME", str(home))  # the API and the workers find the model by id
    with postgres_or_skip() as url:
        code = main([
            "--queue", url, "--model", MODEL, "--steps", "2", "--workers", "1,2",
            "--requests", "4", "--repeats", "1", "--durability-reps", "2",
            "--durability-jobs", "3", "--kill-window", "1", "--lease-s", "1",
            "--start-timeout", "120", "--drain-timeout", "60", "--job-timeout", "60",
            "--work-dir", str(tmp_path / "work"), "--json",
        ])
    assert code == 0
    result = json.loads(capsys.readouterr().out)

    queue = result["queue"]
    assert queue["clients"] == 4 and queue["requests"] == 4 and queue["repeats"] == 1
    assert queue["threads_per_worker"] == 1 and queue["jobs_waiting_at_start"] == 0
    assert [row["workers"] for row in result["scaling"]] == [1, 2]
    for row in result["scaling"]:
        assert [run["succeeded"] for run in row["runs"]] == [4]
        for key in SPREAD:
            s = row[key]
            assert s["min"] <= s["median"] <= s["max"], (key, s)
            assert s["median"] == row["runs"][0][key]  # one run: its own value
        assert row["speedup"] is not None
    assert result["scaling"][0]["speedup"] == 1.0

    d = result["durability"]
    assert d["workers"] == 2 and [r["killed"] for r in d["reps"]] == ["worker", "api"]
    assert all(r["missing_after_restart"] == [] for r in d["reps"])
    assert d["accepted"] == d["succeeded"] + d["failed_with_reason"] + d["cancelled"]
    assert d["lost"] == 0 and d["unfinished_at_timeout"] == 0

    text = summary(result)  # the non-JSON output renders the same result
    assert " 1 workers:" in text and " 2 workers:" in text and "lost 0" in text


def test_queue_mode_refuses_bad_counts(capsys):
    from toile.serve.bench import main

    base = ["--queue", "postgresql://h/db", "--model", MODEL]
    assert main([*base, "--workers", "0,2"]) == 2
    assert main([*base, "--concurrency", "1,4"]) == 2  # one client count with --queue
    assert "one client count" in capsys.readouterr().err

"""The real server in a subprocess: ``kill -9`` it mid-run, restart, and every accepted job
still ends (succeeded, or failed with a reason). None is lost."""

from __future__ import annotations

import io
import json
import time

import pytest

from serve_helpers import MODEL

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def test_kill_9_mid_run_loses_no_accepted_job(tiny_models, toile_home, tmp_path):
    from PIL import Image

    from toile.engine.models import ModelRegistry
    from toile.serve.client import ServeHTTPError
    from toile.serve.process import ServerProcess

    ModelRegistry().add(MODEL, tiny_models("sd"))  # the subprocess inherits TOILE_HOME
    data = tmp_path / "data"
    server = ServerProcess(data, log=tmp_path / "server.log").start()
    try:
        client = server.client()
        accepted = [
            client.submit(prompt=f"job {i}", model=MODEL, steps=40, seed=i)["id"] for i in range(3)
        ]
        deadline = time.monotonic() + 120
        while client.job(accepted[0])["status"] != "running":
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.05)
        # Wait until it is really denoising, then kill: no shutdown code runs.
        while not (client.job(accepted[0])["progress"] or {}).get("step"):
            assert time.monotonic() < deadline, "no progress reported"
            time.sleep(0.05)
    finally:
        server.kill()

    server = ServerProcess(data, port=server.port, log=tmp_path / "server.log").start()
    try:
        client = server.client()
        jobs = {job_id: client.wait(job_id, timeout=240) for job_id in accepted}
        for job in jobs.values():
            assert job["status"] == "succeeded", (job, server.log_tail())
            (image,) = job["images"]
            png = Image.open(io.BytesIO(client.image(image["url"])))
            assert json.loads(png.info["toile"]) == image["record"]
        assert jobs[accepted[0]]["attempts"] == 2  # interrupted once, re-queued, then finished
        assert all(jobs[j]["attempts"] == 1 for j in accepted[1:])
        assert [j["seed"] for j in (jobs[k]["images"][0]["record"] for k in accepted)] == [0, 1, 2]
        with pytest.raises(ServeHTTPError) as info:
            client.submit(prompt="x", model="/etc/passwd")
        assert info.value.status == 422 and info.value.body["error"]["field"] == "model"
    finally:
        server.stop()


"""The server in-process (FastAPI TestClient) with a tiny SD model: jobs, images with records,
idempotency, validation, uploads, auth, cross-origin, cancel, SSE, webhooks, failures."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from serve_helpers import (
    MODEL,
    ScriptedEngine,
    bomb_png_b64,
    parse_sse,
    png_b64,
    serve,
    wait_job,
    wait_until,
)

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    from serve_helpers import tiny_engine

    return tiny_engine(tiny_models("sd"), tmp_path_factory.mktemp("serve-registry"))


@pytest.fixture
def scripted(engine):
    return ScriptedEngine(engine)


def job_body(**fields):
    return {"prompt": "a red circle", "model": MODEL, "steps": 2, "seed": 7, **fields}


def test_submit_poll_image_with_record(scripted, tmp_path):
    from PIL import Image

    with serve(scripted, tmp_path / "data") as client:
        response = client.post("/v1/jobs", json=job_body())
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["status"] == "queued" and response.headers["location"] == accepted["url"]
        job = wait_job(client, accepted["id"])
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1 and job["error"] is None
        (image,) = job["images"]
        assert image["record"]["seed"] == 7 and image["record"]["model_id"] == MODEL
        png = client.get(image["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        decoded = Image.open(io.BytesIO(png.content))
        assert json.loads(decoded.info["toile"]) == image["record"]
        assert "Seed: 7" in decoded.info["parameters"]
        # img2img with an uploaded PNG: stored under uploads/, output follows the input size
        response = client.post("/v1/jobs", json=job_body(image=png_b64(32, 32), strength=0.5))
        assert response.status_code == 202, response.text
        job = wait_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["request"]["image"] is True and job["images"][0]["record"]["mode"] == "img2img"
        # the upload was stored for the job, and is deleted once the job has ended
        wait_until(lambda: not list((tmp_path / "data" / "uploads").iterdir()), what="cleanup")
        listed = client.get("/v1/jobs").json()
        assert [j["status"] for j in listed["jobs"]] == ["succeeded", "succeeded"]
        health = client.get("/health").json()
        assert health == {"ok": True, "queue_length": 0, "running": 0, "worker_alive": True}
        assert client.get("/v1/models").json()["models"][-1] == MODEL
        assert "/v1/jobs/{job_id}/events" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200


def test_api_docs_page_loads_only_local_assets(scripted, tmp_path):
    """/docs must work offline: every script and stylesheet it names is served by toile."""
    with serve(scripted, tmp_path / "data") as client:
        page = client.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', page.text)
        assets = [u for u in urls if u.endswith((".js", ".css"))]
        assert len(assets) >= 2, urls
        for url in assets:
            assert url.startswith("/"), f"/docs loads {url} from outside the server"
            response = client.get(url)
            assert response.status_code == 200 and len(response.content) > 10_000, url
        assert client.get("/openapi.json").json()["info"]["title"] == "toile"


def test_idempotency_key_returns_the_same_job(scripted, tmp_path):
    scripted.gate_at = 1  # keep the worker busy so nothing races the assertions
    with serve(scripted, tmp_path / "data") as client:
        headers = {"Idempotency-Key": "order-42"}
        first = client.post("/v1/jobs", json=job_body(), headers=headers)
        again = client.post("/v1/jobs", json=job_body(), headers=headers)
        assert first.status_code == 202 and again.status_code == 200
        assert first.json()["id"] == again.json()["id"]
        other = client.post("/v1/jobs", json=job_body(seed=8), headers=headers)
        assert other.status_code == 422
        assert other.json()["error"]["field"] == "Idempotency-Key"
        assert client.post("/v1/jobs", json=job_body()).json()["id"] != first.json()["id"]
        assert len(client.get("/v1/jobs").json()["jobs"]) == 2
        scripted.release()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": "5"}, "steps"),
        ({"steps": 500}, "steps"),  # over the server's cap (max_steps=200)
        ({"model": "/etc/passwd"}, "model"),
        ({"model": "../../models/x"}, "model"),
        ({"model": "https://example.com/model.safetensors"}, "model"),
        ({"model": "no-such-model"}, "model"),
        ({"refiner": "/tmp/refiner"}, "refiner"),
        ({"refiner": "no-such-model"}, "refiner"),
        ({"refiner": "tiny-sd"}, "refiner"),  # the tiny SD model has no refiner hand-off
        ({"refiner": "tiny-sd", "refiner_switch": 1.0}, "refiner_switch"),
        ({"refiner_switch": 0.5}, "refiner_switch"),  # a switch without a refiner
        ({"sampler": "eulr"}, "sampler"),
        ({"schedule": "polyexponential"}, "schedule"),
        ({"sampler": "DDIM", "schedule": "karras"}, "schedule"),  # DDIM has no sigma schedule
        ({"sampler_name": "Euler"}, "sampler_name"),  # A1111's spelling is for /sdapi only
        ({"prompt": None}, "prompt"),
        ({"guidance": -1}, "guidance"),
        ({"num_images": 99}, "num_images"),
        ({"strength": 0.5}, "strength"),  # strength without an image
        ({"mask": None, "outpaint": {"left": 8}}, "outpaint"),  # outpaint without an image
        ({"loras": [{"id": "style"}]}, "loras[0].id"),
        ({"loras": [{"path": "/tmp/x.safetensors"}]}, "loras[0].path"),
        ({"webhook": "file:///etc/passwd"}, "webhook"),
        ({"image": "not base64!"}, "image"),
        ({"image": base64.b64encode(b"GIF89a" + b"\0" * 64).decode()}, "image"),
        ({"image": bomb_png_b64()}, "image"),
    ],
)
def test_validation_errors_name_the_field(changes, field, scripted, tmp_path):
    body = job_body(**changes)
    body = {k: v for k, v in body.items() if not (k == "prompt" and v is None)}
    with serve(scripted, tmp_path / "data") as client:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == field, error
        assert error["message"].startswith(field)
        assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was queued
        assert list((tmp_path / "data" / "uploads").iterdir()) == []  # nor written


def test_decompression_bomb_and_size_caps(scripted, tmp_path):
    with serve(scripted, tmp_path / "data", max_body_bytes=64 * 1024) as client:
        bomb = client.post("/v1/jobs", json=job_body(image=bomb_png_b64()))
        assert bomb.status_code == 422
        assert "decompression bomb" in bomb.json()["error"]["message"]
        big = client.post("/v1/jobs", json=job_body(negative_prompt="x" * 70_000))
        assert big.status_code == 413 and big.json()["error"]["field"] == "body"
        bad_json = client.post(
            "/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert bad_json.status_code == 422 and bad_json.json()["error"]["field"] == "body"
    with serve(scripted, tmp_path / "data2", max_image_pixels=16 * 16) as client:
        response = client.post("/v1/jobs", json=job_body(image=png_b64(32, 32)))
        assert response.status_code == 422
        assert "at most 256" in response.json()["error"]["message"]


def test_auth_token_and_public_paths(scripted, tmp_path):
    token = "s3cret-token-123"
    with serve(scripted, tmp_path / "data", api_token=token) as client:
        assert client.get("/v1/jobs").status_code == 401
        wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer nope-nope-nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["field"] == "Authorization"
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        right = client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"})
        assert right.status_code == 200
        assert client.post("/v1/jobs", json=job_body()).status_code == 401
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/health").status_code == 200
        # with a token, any Host may be used (a reverse proxy's name, a LAN address)
        lan = client.get("/health", headers={"Host": "192.168.1.20:7860"})
        assert lan.status_code == 200


def test_host_check_without_token_stops_dns_rebinding(scripted, tmp_path):
    with serve(scripted, tmp_path / "data") as client:
        assert client.get("/health").status_code == 200
        evil = client.get("/v1/jobs", headers={"Host": "attacker.example:7860"})
        assert evil.status_code == 403 and evil.json()["error"]["field"] == "Host"
        assert client.get("/v1/jobs", headers={"Host": "localhost:7860"}).status_code == 200


def test_non_loopback_bind_without_token_is_refused(tmp_path, monkeypatch, capsys):
    import uvicorn

    from toile.cli.main import main
    from toile.errors import RequestError
    from toile.serve.config import ServeConfig

    def never(*args, **kwargs):
        raise AssertionError("the server must not start")

    monkeypatch.setattr(uvicorn, "run", never)
    monkeypatch.delenv("TOILE_API_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    assert "refusing to listen on 0.0.0.0 without an API token" in capsys.readouterr().err
    with pytest.raises(RequestError) as info:
        ServeConfig(host="192.168.1.5").check_bind()
    assert info.value.field == "host"
    ServeConfig(host="0.0.0.0", api_token="long-enough-token").check_bind()
    ServeConfig(host="::1").check_bind()


def test_cross_origin_state_changes_are_rejected(scripted, tmp_path):
    scripted.gate_at = 1
    with serve(scripted, tmp_path / "data") as client:
        evil = client.post("/v1/jobs", json=job_body(), headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and evil.json()["error"]["field"] == "Origin"
        null = client.post("/v1/jobs", json=job_body(), headers={"Origin": "null"})
        assert null.status_code == 403
        site = client.post("/v1/jobs", json=job_body(), headers={"Sec-Fetch-Site": "cross-site"})
        assert site.status_code == 403 and site.json()["error"]["field"] == "Sec-Fetch-Site"
        assert client.get("/v1/jobs").json()["jobs"] == []
        same = client.post(
            "/v1/jobs",
            json=job_body(),
            headers={"Origin": "http://127.0.0.1:7860", "Sec-Fetch-Site": "same-origin"},
        )
        assert same.status_code == 202
        job_id = same.json()["id"]
        cancel = client.post(
            f"/v1/jobs/{job_id}/cancel", headers={"Origin": "https://evil.example"}
        )
        assert cancel.status_code == 403
        scripted.release()


def test_cancel_queued_and_running(scripted, tmp_path):
    """A running job stops within one denoising step of the cancel; a queued one never starts."""
    scripted.gate_at = 2
    with serve(scripted, tmp_path / "data") as client:
        running = client.post("/v1/jobs", json=job_body(prompt="long", steps=8)).json()["id"]
        queued = client.post("/v1/jobs", json=job_body(prompt="next")).json()["id"]
        assert scripted.reached.wait(60), "the first job never reached step 2"
        assert client.get(f"/v1/jobs/{queued}").json()["queue_position"] == 1
        progress = client.get(f"/v1/jobs/{running}").json()["progress"]
        assert progress == {"step": 2, "total": 8, "stage": "denoise"}
        assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"
        assert client.post(f"/v1/jobs/{running}/cancel").json()["status"] == "running"
        scripted.release()  # the worker continues: the next step sees the cancel
        job = wait_job(client, running)
        assert job["status"] == "cancelled" and job["images"] == []
        assert scripted.steps["long"][-1] == 2  # no step was reported after the cancel
        never = client.get(f"/v1/jobs/{queued}").json()
        assert never["status"] == "cancelled" and never["started_at"] is None
        assert "next" not in scripted.steps
        # the worker goes on with the next job
        after = client.post("/v1/jobs", json=job_body(prompt="after")).json()["id"]
        assert wait_job(client, after)["status"] == "succeeded"
        assert client.post("/v1/jobs/0123/cancel").status_code == 404


def test_events_stream_in_order_and_late_subscriber(scripted, tmp_path):
    with serve(scripted, tmp_path / "data", preview_every=1) as client:
        job_id = client.post("/v1/jobs", json=job_body(steps=3)).json()["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            text = "".join(response.iter_text())
        events = parse_sse(text)
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "finished" and kinds.count("finished") == 1
        assert "started" in kinds and kinds.index("started") < kinds.index("progress")
        steps = [data["step"] for kind, data in events if kind == "progress"]
        assert steps == sorted(steps) and steps[-1] == 3
        previews = [data["preview_png"] for kind, data in events if "preview_png" in data]
        assert previews and base64.b64decode(previews[-1]).startswith(b"\x89PNG")
        finished = events[-1][1]
        assert finished["status"] == "succeeded" and finished["images"][0]["url"]
        late = parse_sse(client.get(f"/v1/jobs/{job_id}/events").text)
        assert [kind for kind, _ in late] == ["finished"]
        assert client.get("/v1/jobs/ffffffffffffffffffffffffffffffff/events").status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook", "http://2130706433/", "http://0x7f.1/", "http://127.1/",
        "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:a00:1]/",
        "http://10.1.2.3/", "http://172.16.0.1/", "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data", "http://[fe80::1]/", "http://0.0.0.0/",
        "http://224.0.0.1/", "http://[ff02::1]/", "http://240.0.0.1/", "http://100.64.0.1/",
        "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
    ],
)
def test_webhooks_to_non_public_addresses_are_refused_in_every_spelling(url):
    from toile.errors import RequestError
    from toile.serve.webhooks import check_webhook_url

    with pytest.raises(RequestError) as info:
        check_webhook_url(url)
    assert info.value.field == "webhook" and "public address" in str(info.value)


def test_webhook_names_are_checked_on_every_answer(monkeypatch):
    """A name with one private answer among public ones is refused as a whole (DNS answers
    that mix in an internal address), and public literal addresses pass."""
    import socket

    from toile.serve import webhooks

    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 80))]
    monkeypatch.setattr(webhooks.socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(webhooks.BlockedAddressError, match="10.0.0.7"):
        webhooks.resolve_public("hooks.example.com", 80, ())
    assert webhooks.resolve_public("hooks.example.com", 80, webhooks.allowed_networks(
        ["10.0.0.0/8"]))  # admitted by the config
    monkeypatch.undo()
    assert webhooks.check_webhook_url("http://93.184.216.34/hook")
    assert webhooks.check_webhook_url("https://hooks.example.com/x")  # names: at delivery


def test_webhook_is_called_on_a_loopback_receiver(scripted, tmp_path):
    received: list[dict] = []
    got = threading.Event()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()
            got.set()

        def log_message(self, *args):
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        url = f"http://127.0.0.1:{receiver.server_port}/hook"
        by_name = f"http://localhost:{receiver.server_port}/hook"
        with serve(scripted, tmp_path / "data") as client:
            # loopback is not public: refused at submit as a literal address, and by name at
            # delivery (after resolving) without ever connecting
            refused = client.post("/v1/jobs", json=job_body(webhook=url))
            assert refused.status_code == 422 and refused.json()["error"]["field"] == "webhook"
            job_id = client.post("/v1/jobs", json=job_body(webhook=by_name)).json()["id"]
            status = wait_until(
                lambda: client.get(f"/v1/jobs/{job_id}").json()["webhook_status"], what="status"
            )
            assert status == "failed" and not received  # no detail for the client
        # a deployment admits its own network's range in the config
        with serve(scripted, tmp_path / "data2", webhook_allow=("127.0.0.0/8",)) as client:
            job_id = client.post("/v1/jobs", json=job_body(webhook=url)).json()["id"]
            assert got.wait(60), "the webhook was not called"
            assert received[0]["id"] == job_id and received[0]["status"] == "succeeded"
            assert received[0]["images"][0]["record"]["seed"] == 7
            status = wait_until(
                lambda: client.get(f"/v1/jobs/{job_id}").json()["webhook_status"], what="status"
            )
            assert status == "delivered"
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(10)


def test_a_failing_job_does_not_stop_the_next(scripted, tmp_path):
    scripted.fail["explode"] = RuntimeError("boom in the pipeline")
    scripted.fail["too big"] = MemoryError("could not allocate 40 GB")
    with serve(scripted, tmp_path / "data") as client:
        ids = [
            client.post("/v1/jobs", json=job_body(prompt=prompt)).json()["id"]
            for prompt in ("explode", "too big", "fine")
        ]
        failed, oom, fine = (wait_job(client, job_id) for job_id in ids)
        assert failed["status"] == "failed"
        assert "boom in the pipeline" in failed["error"]["message"]
        assert oom["status"] == "failed" and "out of memory" in oom["error"]["message"]
        assert fine["status"] == "succeeded"
        assert client.get("/health").json()["ok"] is True


def test_graceful_shutdown_requeues_the_running_job(engine, scripted, tmp_path):
    """Stopping the server is not the client's cancel: the interrupted job runs after restart."""
    scripted.gate_at = 1
    with serve(scripted, tmp_path / "data") as client:
        job_id = client.post("/v1/jobs", json=job_body(steps=3)).json()["id"]
        assert scripted.reached.wait(60)
        timer = threading.Timer(0.5, scripted.release)  # shutdown waits on the gated step
        timer.start()
    timer.join()
    with serve(ScriptedEngine(engine), tmp_path / "data") as client:
        job = wait_job(client, job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 1


def test_a_lora_registered_while_serving_is_used_without_restart(scripted, tiny_models, tmp_path):
    """`toile loras add` on the server's machine (here: the same registry, as that command
    writes it) is picked up by a running server: listed, applied, and a vanished file is a
    clear error on the field. Clients only ever name ids."""
    from finetune_common import make_images, train
    from toile.engine.models import LoraRegistry

    lora = tmp_path / "sks.safetensors"
    train(tiny_models("sd"), make_images(tmp_path / "images"), lora, steps=4, batch_size=2)
    with serve(scripted, tmp_path / "data") as client:
        refused = client.post("/v1/jobs", json=job_body(loras=[{"id": "sks"}]))
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "loras[0].id"
        assert "unknown LoRA id 'sks'" in refused.json()["error"]["message"]
        assert client.get("/v1/models").json()["loras"] == []

        LoraRegistry().add("sks", lora)
        assert client.get("/v1/models").json()["loras"] == ["sks"]
        assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["sks"]
        ids = [client.post("/v1/jobs", json=job_body(**extra)).json()["id"]
               for extra in ({}, {"loras": [{"id": "sks", "scale": 1.0}]})]
        plain, styled = (wait_job(client, job_id) for job_id in ids)
        assert plain["status"] == styled["status"] == "succeeded", (plain, styled)
        images = [client.get(job["images"][0]["url"]).content for job in (plain, styled)]
        assert images[0] != images[1]  # the LoRA changed the output

        lora.unlink()
        gone = client.post("/v1/jobs", json=job_body(loras=[{"id": "sks"}]))
        assert gone.status_code == 422 and gone.json()["error"]["field"] == "loras[0].id"
        assert "file is gone" in gone.json()["error"]["message"]
        assert str(tmp_path) not in gone.text  # the server's paths are not shown to clients
        assert client.post("/v1/jobs", json=job_body()).status_code == 202


def test_a_damaged_row_fails_its_job_and_the_queue_goes_on(scripted, tmp_path):
    """A row whose stored request is not JSON fails with the reason; the listing still works
    and the next job runs."""
    import sqlite3

    scripted.gate_at = 1  # hold the first job so the others wait in the queue
    with serve(scripted, tmp_path / "data") as client:
        first = client.post("/v1/jobs", json=job_body()).json()["id"]
        damaged = client.post("/v1/jobs", json=job_body(seed=8)).json()["id"]
        after = client.post("/v1/jobs", json=job_body(seed=9)).json()["id"]
        with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
            db.execute("UPDATE jobs SET request = '{not json' WHERE id = ?", (damaged,))
        listing = client.get("/v1/jobs")
        assert listing.status_code == 200 and len(listing.json()["jobs"]) == 3
        scripted.release()
        assert wait_job(client, first)["status"] == "succeeded"
        failed = wait_job(client, damaged)
        assert failed["status"] == "failed"
        assert "stored request is damaged" in failed["error"]["message"]
        assert wait_job(client, after)["status"] == "succeeded"


def test_a_damaged_database_is_one_line_with_advice(tmp_path, toile_home):
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.sqlite3").write_bytes(b"this is not a database" * 100)
    toile = str(Path(sys.executable).parent / "toile")
    env = dict(os.environ, TOILE_HOME=str(toile_home))
    proc = subprocess.run([toile, "serve", "--data-dir", str(data), "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is damaged" in proc.stderr and "move the file aside" in proc.stderr


def test_a_full_disk_is_a_json_answer(scripted, tmp_path, monkeypatch):
    import errno

    from toile.serve import jobs

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs, "write_durably", full)
    with serve(scripted, tmp_path / "data") as client:
        response = client.post("/v1/jobs", json=job_body(image=png_b64(32, 32), strength=0.5))
        assert response.status_code == 507
        assert response.json()["error"]["type"] == "insufficient_storage"
        assert client.get("/health").status_code == 200  # and it serves the next request


def test_uploads_end_with_their_job_results_expire_and_data_is_private(scripted, tmp_path):
    """Uploads are deleted when their job ends; results older than retention_days go, with
    their files, at start-up and after each job; leftovers of a crash are cleaned; the data
    folder and its files are for the server's user only."""
    import os
    import stat

    data = tmp_path / "data"
    with serve(scripted, data) as client:
        job = client.post("/v1/jobs", json=job_body(image=png_b64(32, 32), strength=0.5))
        finished = wait_job(client, job.json()["id"])
        assert finished["status"] == "succeeded"
        wait_until(lambda: not list((data / "uploads").iterdir()), what="upload deleted")
        image = data / "images" / f"{finished['images'][0]['id']}.png"
        assert image.is_file()
    for path in (data, data / "images", data / "uploads"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in (data / "jobs.sqlite3", image):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # a crash left a half-written temp file and an upload of an ended job
    (data / "images" / ".x.png.tmp-1234").write_bytes(b"partial")
    (data / "uploads" / f"{finished['id']}-image.png").write_bytes(b"stale")
    old = time.time() - 3 * 86400
    os.utime(image, (old, old))
    import sqlite3

    with sqlite3.connect(data / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (old, finished["id"]))
    with serve(scripted, data, retention_days=2) as client:
        assert client.get(f"/v1/jobs/{finished['id']}").status_code == 404
        assert not image.exists()
        assert list((data / "uploads").iterdir()) == []
        assert list((data / "images").glob(".*tmp*")) == []
        fresh = wait_job(client, client.post("/v1/jobs", json=job_body()).json()["id"])
        assert fresh["status"] == "succeeded"  # recent jobs are kept
        assert client.get(f"/v1/jobs/{fresh['id']}").status_code == 200


def test_clients_see_only_their_own_jobs_and_the_admin_sees_all(scripted, tmp_path):
    clients = {"alice": "alice-token-1", "bob": "bob-token-22"}
    alice, bob, admin = ({"Authorization": f"Bearer {t}"} for t in
                         (clients["alice"], clients["bob"], "admin-token-333"))
    with serve(scripted, tmp_path / "data", api_token="admin-token-333",
               clients=clients) as client:
        assert client.get("/v1/jobs").status_code == 401
        key = {"Idempotency-Key": "same-key"}
        mine = client.post("/v1/jobs", json=job_body(), headers=alice | key).json()["id"]
        theirs = client.post("/v1/jobs", json=job_body(), headers=bob | key).json()["id"]
        assert mine != theirs  # one client's keys are not another's
        job = wait_job(client, mine, headers=alice)
        image_url = job["images"][0]["url"]
        assert client.get(image_url, headers=alice).status_code == 200
        for path in (f"/v1/jobs/{mine}", image_url, f"/v1/jobs/{mine}/events"):
            assert client.get(path, headers=bob).status_code == 404, path  # not even "exists"
        assert client.post(f"/v1/jobs/{mine}/cancel", headers=bob).status_code == 404
        assert [j["id"] for j in client.get("/v1/jobs", headers=alice).json()["jobs"]] == [mine]
        assert [j["id"] for j in client.get("/v1/jobs", headers=bob).json()["jobs"]] == [theirs]
        everyone = {j["id"] for j in client.get("/v1/jobs", headers=admin).json()["jobs"]}
        assert everyone == {mine, theirs}
        assert client.get(image_url, headers=admin).status_code == 200
        wait_job(client, theirs, headers=bob)


def test_a_schema_1_database_gains_owners(tmp_path):
    import sqlite3

    from toile.serve.spec import JobSpec
    from toile.serve.store import JobStore

    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    store.insert("a" * 32, JobSpec(prompt="x", model=MODEL, seed=1), body_hash="h")
    store.close()
    with sqlite3.connect(path) as db:  # what toile before client tokens wrote
        db.execute("ALTER TABLE jobs DROP COLUMN owner")
        db.execute("PRAGMA user_version = 1")
    store = JobStore(path)
    assert store.get("a" * 32).owner == ""
    assert store.pragma("user_version") == 3
    store.close()

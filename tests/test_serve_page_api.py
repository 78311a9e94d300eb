"""What the web page reads from the API besides jobs: the server-wide event stream that keeps
its header's counts live (``GET /v1/events``), and the model listing's ``family`` and
``refiner`` fields that decide which models the page offers as a refiner, and its
``samplers`` that fill the page's Sampler and Schedule lists."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator

import pytest

from serve_helpers import MODEL, ScriptedEngine, live_server, serve, tiny_engine

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    return tiny_engine(tiny_models("sd"), tmp_path_factory.mktemp("page-api-registry"))


def status_reader(lines: Iterator[str]) -> Callable[[Callable[[dict], bool]], dict]:
    """``until(check)``: read ``status`` events from the stream until one passes ``check``."""

    def until(check: Callable[[dict], bool]) -> dict:
        kind = None
        for line in lines:
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind == "status":
                status = json.loads(line[5:])
                if check(status):
                    return status
        raise AssertionError("the stream ended")

    return until


def test_server_events_follow_the_queue(engine, tmp_path):
    """One status at once, then a fresh one whenever a job is queued, starts or ends: a job
    held at its first step shows as running, one submitted meanwhile as queued, and both
    leave the counts when they end. (``requests``' read timeout bounds every wait.)"""
    import requests

    scripted = ScriptedEngine(engine)
    scripted.gate_at = 1
    body = {"prompt": "held", "model": MODEL, "steps": 2, "seed": 1}
    with live_server(scripted, tmp_path / "data", sse_keepalive_s=60) as port:
        url = f"http://127.0.0.1:{port}"
        with requests.get(f"{url}/v1/events", stream=True, timeout=60) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            until = status_reader(response.iter_lines(chunk_size=None, decode_unicode=True))
            first = until(lambda status: True)
            assert first == {"ok": True, "queue_length": 0, "running": 0, "worker_alive": True}

            held = requests.post(f"{url}/v1/jobs", json=body, timeout=30).json()["id"]
            until(lambda status: status["running"] == 1 and status["queue_length"] == 0)
            assert scripted.reached.wait(30)
            waiting = requests.post(f"{url}/v1/jobs", json={**body, "prompt": "next"}, timeout=30)
            until(lambda status: status["running"] == 1 and status["queue_length"] == 1)

            scripted.release()
            idle = until(lambda status: status["running"] == 0 and status["queue_length"] == 0)
            assert idle["ok"] is True
            for job_id in (held, waiting.json()["id"]):
                job = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
                assert job["status"] == "succeeded", job
        paths = requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
        assert "text/event-stream" in paths["/v1/events"]["get"]["responses"]["200"]["content"]


def test_server_events_need_the_token(engine, tmp_path):
    token = "page-api-token-123"
    with serve(ScriptedEngine(engine), tmp_path / "data", api_token=token) as client:
        assert client.get("/v1/events").status_code == 401


def test_models_list_family_and_refiner_role(engine, tiny_models, tmp_path):
    """``refiner`` is true exactly for what the engine can hand a schedule to: an SDXL refiner
    or base (same family as the base, img2img); not SD (no hand-off), not an SDXL inpainting
    checkpoint (no img2img), not a model whose files cannot be read."""
    from toile.engine.models import ModelRegistry

    sdxl = tiny_models("sdxl")
    inpainting = tmp_path / "sdxl-inpainting"  # configs are all the listing reads
    (inpainting / "unet").mkdir(parents=True)
    shutil.copy(sdxl / "model_index.json", inpainting / "model_index.json")
    unet = json.loads((sdxl / "unet" / "config.json").read_text())
    (inpainting / "unet" / "config.json").write_text(json.dumps({**unet, "in_channels": 9}))

    registry = ModelRegistry(tmp_path / "models.json")
    registry.add(MODEL, tiny_models("sd"))
    registry.add("tiny-sdxl", sdxl)
    registry.add("tiny-sdxl-refiner", tiny_models("sdxl_refiner"))
    registry.add("tiny-sdxl-inpainting", inpainting)
    registry.add("vanished", tmp_path / "nowhere")
    scripted = ScriptedEngine(engine)
    scripted.registry = registry
    with serve(scripted, tmp_path / "data") as client:
        listing = client.get("/v1/models").json()
    cards = {card["id"]: card for card in listing["data"]}
    roles = {model: (cards[model]["family"], cards[model]["refiner"]) for model in cards}
    assert roles == {
        "toile-mini": roles["toile-mini"],  # the built-in: whatever this checkout holds
        "toile-reader": ("toile", False),  # toile's own reader and SR stage
        "toile-sr": ("toile", False),
        MODEL: ("sd", False),
        "tiny-sdxl": ("sdxl", True),
        "tiny-sdxl-refiner": ("sdxl", True),
        "tiny-sdxl-inpainting": ("sdxl", False),
        "vanished": (None, False),
        # the built-in upscalers: resampling filters, never a refiner
        **{name: ("resize", False) for name in ("lanczos", "bicubic", "nearest")},
    }
    assert cards["lanczos"]["tasks"] == ["upscale"] and cards["vanished"]["tasks"] == []
    assert cards["toile-sr"]["tasks"] == ["upscale"]
    assert cards["toile-reader"]["tasks"] == ["caption", "answer"]
    assert cards[MODEL]["tasks"] == ["generate"]
    assert roles["toile-mini"][1] is False
    assert listing["models"] == list(cards)
    assert {"id", "object", "created", "owned_by"} <= set(listing["data"][0])


def test_models_list_the_samplers_each_model_can_use(engine, tiny_models, tmp_path):
    """Each card lists the samplers a job on that model can name, its own marked ``default``,
    each with the schedules it supports there (from configs: nothing is loaded): the tiny SD
    model (DDIMScheduler) the ε samplers, toile's own exactly what its sampling code runs,
    a single file or an unreadable model none (the page then offers only the default)."""
    from toile.engine.models import ModelRegistry

    registry = ModelRegistry(tmp_path / "models.json")
    registry.add(MODEL, tiny_models("sd"))
    registry.add("tiny-sd-file", tiny_models("sd_single_file"))
    registry.add("vanished", tmp_path / "nowhere")
    scripted = ScriptedEngine(engine)
    scripted.registry = registry
    with serve(scripted, tmp_path / "data") as client:
        listing = client.get("/v1/models").json()
    cards = {card["id"]: card for card in listing["data"]}

    sd = {option["name"]: option for option in cards[MODEL]["samplers"]}
    assert [name for name, option in sd.items() if option["default"]] == ["DDIM"]
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "DDIM"} <= set(sd)
    assert "karras" in sd["DPM++ 2M"]["schedules"]
    assert sd["DPM++ 2M"]["schedules"][0] == "automatic"
    assert "karras" not in sd["DDIM"]["schedules"]
    assert all(option["schedules"][0] == "automatic" for option in sd.values())

    assert cards["toile-mini"]["samplers"] == [
        {"name": "Euler", "schedules": ["automatic"], "default": True},
        {"name": "Euler a", "schedules": ["automatic"], "default": False},
        {"name": "Heun", "schedules": ["automatic"], "default": False},
        {"name": "DPM++ 2M", "schedules": ["automatic"], "default": False},
        {"name": "UniPC", "schedules": ["automatic"], "default": False},
    ]
    assert cards["tiny-sd-file"]["samplers"] == []
    assert cards["vanished"]["samplers"] == []

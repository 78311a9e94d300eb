"""The server's tasks beyond generate, through real HTTP: upscale and caption jobs on the native
API, A1111's extras, upscalers and interrogate (with the ``webuiapi`` client), OpenAI edits on
an instruction-edit model, task input errors naming the field, and the stored JobSpec."""

from __future__ import annotations

import base64
import io
import json

import pytest
import webuiapi

from serve_helpers import ScriptedEngine, live_server, png_b64, serve, wait_job

pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONER = "tiny-blip"
ANSWERER = "tiny-blip-vqa"
EDITOR = "tiny-ip2p"


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    """An id-only engine with the built-in upscalers, a tiny BLIP captioner and question
    answerer (each the only model of its task, so that task's default) and a tiny
    InstructPix2Pix editor."""
    from toile.engine.engine import Engine
    from toile.engine.models import ModelRegistry

    registry = ModelRegistry(tmp_path_factory.mktemp("tasks-registry") / "models.json")
    registry.add(CAPTIONER, tiny_models("blip"))
    registry.add(ANSWERER, tiny_models("blip_vqa"))
    registry.add(EDITOR, tiny_models("sd_ip2p"))
    return Engine(registry, device="cpu", allow_paths=False)


@pytest.fixture
def scripted(engine):
    return ScriptedEngine(engine)


def png_image(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def gradient(width: int, height: int):
    from helpers import gradient_image

    return gradient_image(width, height)


# --------------------------------------------------------------------------- the spec
def test_job_spec_round_trip_and_old_rows():
    from toile.errors import RequestError
    from toile.request import Detail, Outpaint, Task
    from toile.serve.schemas import TaskName
    from toile.serve.spec import JobSpec, JobStatus, LoraRef

    spec = JobSpec(
        prompt="a cat", model="tiny-sd", seed=7, negative_prompt="blur", task=Task.ANSWER,
        question="what colour?", detail=Detail.LONG, num_images=2, loras=(LoraRef("sks", 0.5),),
        outpaint=Outpaint(8, 0, 8, 0), image="0" * 32 + "-image.png", sampler="Euler",
    )
    again = JobSpec.from_json(spec.to_json())
    assert again == spec and again.task is Task.ANSWER and again.detail is Detail.LONG
    assert json.loads(spec.to_json())["outpaint"] == {"left": 8, "top": 0, "right": 8, "bottom": 0}
    assert spec.uploads() == {"image": "0" * 32 + "-image.png"}
    view = spec.view()
    assert view["image"] is True and view["mask"] is False and view["task"] == "answer"
    # what schema 2 stored (no task fields) reads as a generate job
    old = {"prompt": "x", "negative_prompt": "", "width": None, "height": None, "steps": 2,
           "guidance": None, "seed": 3, "num_images": 1, "strength": None, "model": "tiny-sd",
           "refiner": None, "refiner_switch": None, "sampler": None, "schedule": None,
           "image": None, "mask": None, "outpaint": None, "loras": [{"id": "a", "scale": 1.0}]}
    assert JobSpec.from_dict(old) == JobSpec(prompt="x", model="tiny-sd", seed=3, steps=2,
                                             loras=(LoraRef("a", 1.0),))
    with pytest.raises(RequestError) as info:
        JobSpec(prompt="x", model="m", seed=1, image="../../etc/passwd")
    assert info.value.field == "image"
    with pytest.raises(RequestError) as info:
        JobSpec.from_dict({**old, "task": "dance"})
    assert info.value.field == "task"
    with pytest.raises(TypeError):
        JobSpec.from_dict({"prompt": "no model or seed"})
    assert [status.value for status in JobStatus] == [
        "queued", "running", "succeeded", "failed", "cancelled"]
    assert [s for s in JobStatus if s.terminal] == [
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]
    assert set(TaskName.__args__) == {task.value for task in Task}


# --------------------------------------------------------------------------- native API
def test_upscale_and_caption_jobs_and_bad_inputs(scripted, tmp_path):
    from PIL import Image

    with serve(scripted, tmp_path / "data") as client:
        response = client.post("/v1/jobs", json={
            "task": "upscale", "model": "lanczos", "image": png_b64(16, 12), "scale": 2})
        assert response.status_code == 202, response.text
        job = wait_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        record = job["images"][0]["record"]
        assert (record["task"], record["mode"], record["scale"]) == ("upscale", "upscale", 2.0)
        assert (record["width"], record["height"]) == (32, 24) and job["texts"] == []
        assert job["request"]["task"] == "upscale" and job["request"]["image"] is True
        png = client.get(job["images"][0]["url"])
        assert Image.open(io.BytesIO(png.content)).size == (32, 24)

        # a caption job with no model runs on the caption task's model
        response = client.post("/v1/jobs", json={"task": "caption", "image": png_b64(32, 32)})
        assert response.status_code == 202, response.text
        job = wait_job(client, response.json()["id"], timeout=120)
        assert job["status"] == "succeeded", job
        assert job["images"] == [] and len(job["texts"]) == 1
        text = job["texts"][0]
        assert isinstance(text["text"], str) and text["text"]
        assert text["record"]["text"] == text["text"] and text["record"]["task"] == "caption"
        assert text["record"]["model_id"] == CAPTIONER and job["request"]["model"] == CAPTIONER
        response = client.post("/v1/jobs", json={
            "task": "answer", "image": png_b64(32, 32), "question": "what colour is it?"})
        job = wait_job(client, response.json()["id"], timeout=120)
        assert job["status"] == "succeeded", job
        record = job["texts"][0]["record"]
        assert (record["task"], record["question"], record["model_id"]) == (
            "answer", "what colour is it?", ANSWERER)

        for body, field in (
            ({"task": "caption", "model": CAPTIONER}, "image"),  # no image to describe
            ({"task": "answer", "model": CAPTIONER, "image": png_b64(), "question": "?" * 1001},
             "question"),
            ({"task": "upscale", "model": "lanczos", "image": png_b64(), "scale": 9}, "scale"),
            ({"task": "upscale", "model": "lanczos", "image": png_b64(), "question": "why?"},
             "question"),
            ({"task": "dance", "image": png_b64()}, "task"),
            ({"task": "caption", "model": "lanczos", "image": png_b64()}, "model"),
            ({"task": "upscale", "model": "lanczos"}, "image"),
            ({"prompt": "x", "scale": 2.0, "model": "lanczos"}, "scale"),  # generate: no scale
        ):
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error"]["field"] == field, (body, response.text)
        # and the server still serves the next request
        response = client.post("/v1/jobs", json={
            "task": "upscale", "model": "nearest", "image": png_b64(8, 8), "scale": 3})
        job = wait_job(client, response.json()["id"])
        assert job["status"] == "succeeded" and job["images"][0]["record"]["width"] == 24
        # no model: the upscale task's own (the built-in toile-sr stage here), fixed at submit
        response = client.post("/v1/jobs", json={"task": "upscale", "image": png_b64(8, 8)})
        assert response.status_code == 202, response.text
        job = wait_job(client, response.json()["id"])
        assert job["request"]["model"] == "toile-sr" and job["status"] == "succeeded", job
        assert job["images"][0]["record"]["width"] == 32  # its own factor, 4
        listing = client.get("/v1/models").json()
        models = {card["id"]: card for card in listing["data"]}
        assert models[CAPTIONER]["tasks"] == ["caption"] and models[EDITOR]["tasks"] == ["edit"]
        assert listing["task_defaults"]["upscale"] == "toile-sr"
        assert listing["task_defaults"]["caption"] == CAPTIONER


# --------------------------------------------------------------------------- A1111
def test_a1111_extras_upscalers_and_interrogate(scripted, tmp_path):
    import requests

    image = gradient(16, 8)
    with live_server(scripted, tmp_path / "data") as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        names = [item["name"] for item in api.get_upscalers()]
        assert names[:3] == ["None", "Lanczos", "Nearest"] and "bicubic" in names
        assert "lanczos" not in names and CAPTIONER not in names
        lanczos = api.get_upscalers()[1]
        assert lanczos["model_name"] == "lanczos" and lanczos["model_path"] is None

        result = api.extra_single_image(image=image, upscaler_1="Lanczos", upscaling_resize=2)
        assert result.image.size == (32, 16)
        assert "Postprocess upscaler: Lanczos" in result.info
        assert json.loads(result.image.info["toile"])["model_id"] == "lanczos"
        # resize_mode 1: the scale that covers 40x40 (x5), then the centre 40x40
        covered = api.extra_single_image(image=image, upscaler_1="Nearest", resize_mode=1,
                                         upscaling_resize_w=40, upscaling_resize_h=40)
        assert covered.image.size == (40, 40)
        untouched = api.extra_single_image(image=image)  # upscaler_1 "None": as it came
        assert untouched.image.size == (16, 8)
        batch = api.extra_batch_images(images=[image, gradient(8, 8)], upscaler_1="bicubic",
                                       upscaling_resize=3)
        assert [im.size for im in batch.images] == [(48, 24), (24, 24)]

        caption = api.interrogate(image)
        assert isinstance(caption.info, str) and caption.info
        by_id = api.interrogate(image, model=CAPTIONER)
        assert by_id.info == caption.info  # the same model, the same seedless caption

        base = f"http://127.0.0.1:{port}/sdapi/v1"
        payload = {"image": webuiapi.raw_b64_img(image), "upscaler_1": "Lanczos"}
        for changes, field in (
            ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"),
            ({"upscaling_resize": 9}, "upscaling_resize"),
            ({"gfpgan_visibility": 0.5}, "gfpgan_visibility"),
            ({"resize_mode": 1, "upscaling_resize_w": 4, "upscaling_resize_h": 4},
             "upscaling_resize_w"),
            ({"image": "bm90IGFuIGltYWdl"}, "image"),
        ):
            response = requests.post(f"{base}/extra-single-image", json={**payload, **changes},
                                     timeout=60)
            assert response.status_code == 422, (changes, response.text)
            assert response.json()["error"]["field"] == field, (changes, response.text)
        response = requests.post(f"{base}/interrogate",
                                 json={"image": payload["image"], "model": "no-such"}, timeout=60)
        assert response.status_code == 422 and response.json()["error"]["field"] == "model"
        response = requests.post(f"{base}/interrogate", json={"model": "clip"}, timeout=60)
        assert response.status_code == 422 and response.json()["error"]["field"] == "image"
        # every extras call was a job on the queue, with its record
        jobs = requests.get(f"http://127.0.0.1:{port}/v1/jobs", timeout=9).json()["jobs"]
        assert [job["request"]["task"] for job in jobs] == [
            "upscale", "upscale", "upscale", "upscale", "caption", "caption"]


# --------------------------------------------------------------------------- OpenAI
def test_openai_edit_on_an_edit_model_follows_the_instruction(scripted, tmp_path):
    import openai
    from PIL import Image

    from serve_helpers import BASE_URL

    buffer = io.BytesIO()
    gradient(32, 32).save(buffer, format="PNG")
    with serve(scripted, tmp_path / "data") as test_client:
        client = openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="unused",
                               http_client=test_client, max_retries=0)
        result = client.images.edit(
            image=("in.png", buffer.getvalue(), "image/png"), prompt="make it blue",
            model=EDITOR, extra_body={"seed": 3, "steps": 2, "image_guidance": 1.2})
        record = json.loads(png_image(result.data[0].b64_json).info["toile"])
        assert (record["task"], record["mode"], record["prompt"]) == ("edit", "edit",
                                                                       "make it blue")
        assert record["image_guidance"] == 1.2 and record["model_id"] == EDITOR
        mask = io.BytesIO()
        Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(mask, format="PNG")
        with pytest.raises(openai.BadRequestError) as info:  # an instruction edit has no mask
            client.images.edit(image=("in.png", buffer.getvalue(), "image/png"),
                               mask=("mask.png", mask.getvalue(), "image/png"),
                               prompt="make it blue", model=EDITOR)
        assert info.value.body["param"] == "mask"
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(image=("in.png", buffer.getvalue(), "image/png"),
                               prompt="make it blue", model=EDITOR, extra_body={"strength": 0.5})
        assert info.value.body["param"] == "strength"

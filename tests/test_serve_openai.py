"""The OpenAI Images API, driven by the official ``openai`` client over the in-process app
(its HTTP client is the TestClient, an httpx2 client with an ASGI transport): generations,
edits with RGBA masks, the model list, errors in OpenAI's shape, cancelled and failed jobs."""

from __future__ import annotations

import base64
import io
import json
import threading

import openai
import pytest

from serve_helpers import BASE_URL, MODEL, ScriptedEngine, serve, wait_until

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    """The tiny SD engine, with ``tiny-sd`` as the registry's default model (so OpenAI's own
    model names, which mean "the default", never load the built-in model)."""
    from serve_helpers import tiny_engine

    engine = tiny_engine(tiny_models("sd"), tmp_path_factory.mktemp("openai-registry"))
    path = engine.registry.path
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "default": MODEL}))
    return engine


@pytest.fixture
def scripted(engine):
    return ScriptedEngine(engine)


def client_for(test_client):
    return openai.OpenAI(
        base_url=f"{BASE_URL}/v1", api_key="unused", http_client=test_client, max_retries=2
    )


def png_image(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def rgba_png(size=32, transparent_left=True) -> bytes:
    """An RGBA mask as OpenAI wants it: the left half transparent (= edit)."""
    from PIL import Image

    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    if transparent_left:
        mask.paste((0, 0, 0, 0), (0, 0, size // 2, size))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def gradient_png(size=32) -> bytes:
    from helpers import gradient_image

    buffer = io.BytesIO()
    gradient_image(size, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_generations_models_and_errors(scripted, tmp_path):
    with serve(scripted, tmp_path / "data") as test_client:
        client = client_for(test_client)
        result = client.images.generate(
            model=MODEL,
            prompt="a red circle",
            n=2,
            size="32x32",
            response_format="b64_json",
            quality="high",  # accepted, ignored
            extra_body={"seed": 7, "steps": 2, "guidance": 5.0},
        )
        assert len(result.data) == 2 and result.size == "32x32"
        first, second = (png_image(item.b64_json) for item in result.data)
        assert first.size == (32, 32)
        record = json.loads(first.info["toile"])
        assert record["seed"] == 7 and record["steps"] == 2 and record["guidance"] == 5.0
        assert json.loads(second.info["toile"])["seed"] == 8
        # url format, and OpenAI's own model name meaning the default model
        by_url = client.images.generate(
            model="dall-e-3",
            prompt="a blue square",
            response_format="url",
            extra_body={"seed": 3, "steps": 1},
        )
        url = by_url.data[0].url
        assert url.startswith(f"{BASE_URL}/v1/images/")
        png = test_client.get(url)
        assert (
            png.status_code == 200
            and json.loads(png_image(base64.b64encode(png.content)).info["toile"])["model_id"]
            == MODEL
        )

        models = client.models.list()
        ids = [model.id for model in models.data]
        assert MODEL in ids and all(m.owned_by == "toile" for m in models.data)
        raw = test_client.get("/v1/models").json()
        assert raw["object"] == "list" and raw["default"] == MODEL and MODEL in raw["models"]
        assert {"id", "object", "created", "owned_by"} <= set(raw["data"][0])

        for kwargs, param in (
            ({"n": 99}, "n"),
            ({"size": "huge"}, "size"),
            ({"size": "4x4"}, "size"),
            ({"model": "/etc/passwd"}, "model"),
            ({"output_format": "jpeg"}, "output_format"),
            ({"extra_body": {"steps": 0}}, "steps"),
            ({"extra_body": {"sampler": "euler"}}, "sampler"),
        ):
            with pytest.raises(openai.BadRequestError) as info:
                client.images.generate(prompt="x", **kwargs)
            error = info.value.body
            assert error["param"] == param and error["type"] == "invalid_request_error", error
            assert set(error) >= {"message", "type", "param", "code"}
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="x", extra_body={"steps": 500})  # server cap
        assert info.value.body["param"] == "steps"
        streamed = test_client.post("/v1/images/generations", json={"prompt": "x", "stream": True})
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
        assert streamed.headers["x-should-retry"] == "false"
        jobs = test_client.get("/v1/jobs").json()["jobs"]
        assert len(jobs) == 2  # no invalid request reached the queue


def test_edits_convert_openai_masks(scripted, tmp_path):
    from PIL import Image

    original = gradient_png()
    with serve(scripted, tmp_path / "data") as test_client:
        client = client_for(test_client)
        result = client.images.edit(
            image=("in.png", original, "image/png"),
            mask=("mask.png", rgba_png(), "image/png"),
            prompt="a green triangle",
            model=MODEL,
            extra_body={"seed": 11, "steps": 2},
        )
        edited = png_image(result.data[0].b64_json).convert("RGB")
        record = json.loads(png_image(result.data[0].b64_json).info["toile"])
        assert record["mode"] == "inpaint" and record["seed"] == 11
        # opaque mask pixels (the right half) are kept exactly; the transparent half is repainted
        source = Image.open(io.BytesIO(original)).convert("RGB")
        assert edited.getpixel((28, 16)) == source.getpixel((28, 16))
        (job,) = test_client.get("/v1/jobs").json()["jobs"]
        assert job["request"]["mask"] is True and job["request"]["image"] is True
        # the mask as the job got it (its upload is deleted once the job ends): white = repaint
        from toile.serve.routes.openai import edit_inputs

        _, mask = edit_inputs(Image.open(io.BytesIO(original)), Image.open(io.BytesIO(
            rgba_png())), (None, None))
        assert mask.getpixel((4, 16)) == 255 and mask.getpixel((28, 16)) == 0

        # without a mask, an opaque image is an img2img job
        plain = client.images.edit(
            image=("in.png", original, "image/png"),
            prompt="x",
            extra_body={"seed": 1, "steps": 2, "strength": 0.5},
        )
        record = json.loads(png_image(plain.data[0].b64_json).info["toile"])
        assert record["mode"] == "img2img" and record["strength"] == 0.5

        with pytest.raises(openai.BadRequestError) as info:  # a mask without alpha
            client.images.edit(image=original, mask=original, prompt="x")
        assert info.value.body["param"] == "mask"
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(image=b"GIF89a" + b"\0" * 64, prompt="x")
        assert info.value.body["param"] == "image"
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(image=original, prompt="x", n=0)
        assert info.value.body["param"] == "n"


def test_cancelled_and_failed_jobs_are_openai_errors(scripted, tmp_path):
    scripted.fail["explode"] = RuntimeError("boom in the pipeline")
    scripted.gate_at = 1
    with serve(scripted, tmp_path / "data") as test_client:
        client = client_for(test_client)
        outcome: dict = {}

        def generate():
            try:
                client.images.generate(
                    prompt="slow", model=MODEL, extra_body={"steps": 4, "seed": 1}
                )
            except openai.APIStatusError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=generate)
        thread.start()
        assert scripted.reached.wait(60), "the job never reached step 1"
        running = wait_until(
            lambda: test_client.get("/v1/jobs", params={"status": "running"}).json()["jobs"],
            what="a running job",
        )
        test_client.post(f"/v1/jobs/{running[0]['id']}/cancel")
        scripted.release()
        thread.join(60)
        error = outcome["error"]
        assert error.status_code == 409 and error.response.headers["x-should-retry"] == "false"
        assert error.body["code"] == "job_cancelled" and error.body["job_id"] == running[0]["id"]

        scripted.gate_at = None
        with pytest.raises(openai.InternalServerError) as info:
            client.images.generate(prompt="explode", model=MODEL, extra_body={"steps": 1})
        body = info.value.body
        assert body["type"] == "server_error" and "boom in the pipeline" in body["message"]
        assert set(body) >= {"message", "type", "param", "code"}
        # x-should-retry: false, so the client did not run the failing job three times
        assert len(test_client.get("/v1/jobs").json()["jobs"]) == 2


def test_output_size_is_checked_before_any_resizing(scripted, tmp_path, monkeypatch):
    """A size over the pixel budget is refused before the routes spend work resizing to it."""
    import requests
    from PIL import Image

    from serve_helpers import live_server

    calls = []
    real_resize = Image.Image.resize

    def counting_resize(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("size"))
        return real_resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", counting_resize)
    with serve(scripted, tmp_path / "data", max_image_pixels=40 * 40) as test_client:
        client = client_for(test_client)
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(image=("in.png", gradient_png(), "image/png"), prompt="x",
                               size="1024x1024", model=MODEL)
        assert info.value.body["param"] == "size" and "budget of 1600" in info.value.body[
            "message"]
    with live_server(scripted, tmp_path / "data2", max_image_pixels=40 * 40) as port:
        body = {"prompt": "x", "init_images": [base64.b64encode(gradient_png()).decode()],
                "width": 1024, "height": 1024, "steps": 1}
        response = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/img2img", json=body,
                                 timeout=60)
        assert response.status_code == 422 and response.json()["error"]["field"] == "width"
    assert (1024, 1024) not in calls


def test_an_upload_is_decoded_once_per_request(scripted, tmp_path, monkeypatch):
    """The OpenAI and A1111 routes decode (and resize) an input once; the job takes the decoded
    image as it is, and the worker uses it instead of reading the saved file back."""
    import requests

    from serve_helpers import live_server
    from toile.io import images

    calls = []
    real = images.open_image

    def counting(source, **kwargs):
        calls.append(kwargs.get("field"))
        return real(source, **kwargs)

    monkeypatch.setattr(images, "open_image", counting)
    with serve(scripted, tmp_path / "data") as test_client:
        client_for(test_client).images.edit(image=("in.png", gradient_png(), "image/png"),
                                            prompt="x", model=MODEL, extra_body={"steps": 4})
    assert calls == ["image"], calls
    calls.clear()
    with live_server(scripted, tmp_path / "data2") as port:
        body = {"prompt": "x", "init_images": [base64.b64encode(gradient_png()).decode()],
                "width": 64, "height": 64, "steps": 4, "sampler_name": "Default"}
        response = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/img2img", json=body,
                                 timeout=120)
        assert response.status_code == 200, response.text
    assert calls == ["init_images[0]"], calls  # resized to 64x64 without decoding again

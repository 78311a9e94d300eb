"""The AUTOMATIC1111 API, driven by the third-party ``webuiapi`` client (requests) against a
real uvicorn server on a free loopback port: txt2img, img2img/inpaint, samplers, models,
options, progress with previews, interrupt, and errors naming the field."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
import webuiapi

from serve_helpers import MODEL, ScriptedEngine, live_server, wait_until

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    """The tiny SD engine, ``tiny-sd`` the registry's default (requests that name no model
    must never load the built-in one)."""
    from serve_helpers import tiny_engine

    engine = tiny_engine(tiny_models("sd"), tmp_path_factory.mktemp("a1111-registry"))
    path = engine.registry.path
    path.write_text(json.dumps({**json.loads(path.read_text()), "default": MODEL}))
    return engine


@pytest.fixture
def scripted(engine):
    return ScriptedEngine(engine)


def b64_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_txt2img_img2img_models_samplers_options(scripted, tmp_path):
    import requests
    from PIL import Image

    from helpers import gradient_image

    with live_server(scripted, tmp_path / "data") as port:
        # "DDIM" is the tiny model's own scheduler (DDIMScheduler), so webuiapi's sampler works
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DDIM", steps=2)
        assert MODEL in api.util_get_model_names()
        samplers = api.get_samplers()
        by_name = {sampler["name"]: sampler for sampler in samplers}
        assert samplers[0]["name"] == "Default" and by_name["DDIM"]["aliases"] == ["DDIMScheduler"]
        # one name for the ε and flow-matching Euler (tiny SD, toile-mini), classes as aliases
        assert {"EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"} <= set(
            by_name["Euler"]["aliases"])
        assert {"Euler a", "DPM++ 2M", "UniPC", "Heun"} <= set(by_name)
        schedules = [s["name"] for s in requests.get(
            f"http://127.0.0.1:{port}/sdapi/v1/schedulers", timeout=9).json()]
        assert schedules[0] == "automatic" and {"karras", "exponential"} <= set(schedules)
        api.util_set_model(MODEL)  # POST /options {"sd_model_checkpoint": ...}
        assert api.util_get_current_model() == MODEL

        result = api.txt2img(
            prompt="a red circle", seed=5, width=32, height=32, batch_size=2, cfg_scale=5
        )
        assert len(result.images) == 2 and result.images[0].size == (32, 32)
        info = result.info
        assert info["all_seeds"] == [5, 6] and info["seed"] == 5
        assert info["sampler_name"] == "DDIM" and info["cfg_scale"] == 5.0
        assert info["sd_model_name"] == MODEL and info["steps"] == 2
        assert "Seed: 5" in info["infotexts"][0]
        assert result.parameters["prompt"] == "a red circle"
        assert "Seed: 5" in result.images[0].info["parameters"]  # the PNG's own record
        # other samplers and schedules, as A1111's own test payloads send them
        for sampler, scheduler in (("Euler a", None), ("DPM++ 2M", "Karras"), ("UniPC", None)):
            other = api.txt2img(prompt="a red circle", seed=5, width=32, height=32,
                                sampler_name=sampler, scheduler=scheduler)
            assert other.info["sampler_name"] == sampler
            assert other.info["toile_records"][0]["sampler"] == sampler
            assert f"Sampler: {sampler}" in other.info["infotexts"][0]
            if scheduler:
                assert "Schedule type: Karras" in other.info["infotexts"][0]
        legacy = api.txt2img(prompt="x", seed=1, width=32, height=32,
                             sampler_name="DPM++ 2M Karras")  # A1111 < 1.9's combined name
        assert legacy.info["toile_records"][0]["schedule"] == "karras"

        # inpaint: init image + mask (white = repaint), sized by width/height like A1111
        init = gradient_image(32, 32)
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))
        edited = api.img2img(
            images=[init],
            mask_image=mask,
            mask_blur=0,
            prompt="a green square",
            seed=9,
            width=32,
            height=32,
            denoising_strength=0.9,
            sampler_name="Default",
        )
        record = edited.info["toile_records"][0]
        assert record["mode"] == "inpaint" and record["strength"] == 0.9 and record["seed"] == 9
        assert edited.image.convert("RGB").getpixel((28, 16)) == init.getpixel((28, 16))
        # inpainting_mask_invert: the right half is repainted, the left half kept
        inverted = api.img2img(
            images=[init],
            mask_image=mask,
            mask_blur=0,
            inpainting_mask_invert=1,
            seed=9,
            width=32,
            height=32,
            prompt="x",
        )
        assert inverted.image.convert("RGB").getpixel((4, 16)) == init.getpixel((4, 16))
        # plain img2img from a 16x16 image resized to 32x32 (resize_mode 0)
        varied = api.img2img(images=[gradient_image(16, 16)], width=32, height=32, seed=2)
        assert varied.image.size == (32, 32)
        assert varied.info["toile_records"][0]["mode"] == "img2img"


ERROR_CASES = [
    ({"sampler_name": "Eulr"}, "sampler_name"),
    ({"scheduler": "polyexponential"}, "scheduler"),
    # a real schedule the sampler cannot use (DPM-Solver single-step has no timestep spacing)
    ({"sampler_name": "DPM++ SDE", "scheduler": "sgm_uniform"}, "scheduler"),
    ({"steps": 0}, "steps"),
    ({"steps": 500}, "steps"),  # the server's cap
    ({"cfg_scale": -1}, "cfg_scale"),
    ({"width": 4}, "width"),
    ({"seed": -5}, "seed"),
    ({"batch_size": 4, "n_iter": 4}, "batch_size"),
    ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_scale": 9}, "hr_scale"),
    ({"enable_hr": True, "hr_checkpoint_name": "other"}, "hr_checkpoint_name"),
    ({"enable_hr": True, "hr_sampler_name": "Eulr"}, "hr_sampler_name"),
    ({"enable_hr": True, "hr_resize_x": 64, "hr_resize_y": 48}, "hr_resize_x"),
    ({"enable_hr": True, "denoising_strength": 1.5}, "denoising_strength"),
    ({"restore_faces": True}, "restore_faces"),
    ({"alwayson_scripts": {"ControlNet": {"args": [1]}}}, "alwayson_scripts.ControlNet"),
    (
        {"override_settings": {"sd_model_checkpoint": "nope"}},
        "override_settings.sd_model_checkpoint",
    ),
    (
        {"override_settings": {"CLIP_stop_at_last_layers": 2}},
        "override_settings.CLIP_stop_at_last_layers",
    ),
    ({"prompt": "<lora:nope:0.5> a cat"}, "prompt"),
    ({"refiner_checkpoint": "nope [0123456789]"}, "refiner_checkpoint"),
    ({"refiner_checkpoint": MODEL, "refiner_switch_at": 1.5}, "refiner_switch_at"),
    # Known id, but the tiny SD model has no refiner hand-off (only SDXL has): found at run time.
    ({"refiner_checkpoint": MODEL}, "refiner_checkpoint"),
]


def test_hires_fix_with_webuiapi(scripted, tmp_path):
    """webuiapi's txt2img with enable_hr: its default Latent upscaler runs as Lanczos (the
    record says so), a named one as that model; the image is the hires size."""
    with live_server(scripted, tmp_path / "data") as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DDIM", steps=2)
        result = api.txt2img(prompt="a red circle", seed=3, width=32, height=32,
                             enable_hr=True, hr_scale=1.5, denoising_strength=0.5)
        assert result.image.size == (48, 48)
        record = result.info["toile_records"][0]
        assert record["hires"]["upscaler"] == "lanczos" and record["hires"]["strength"] == 0.5
        assert "Hires upscale: 1.5" in result.info["infotexts"][0]
        named = api.txt2img(prompt="x", seed=3, width=32, height=32, enable_hr=True,
                            hr_upscaler="Nearest", hr_resize_x=64, hr_resize_y=64,
                            hr_second_pass_steps=2)
        assert named.image.size == (64, 64)
        own = api.txt2img(prompt="x", seed=3, width=32, height=32, enable_hr=True,
                          hr_scale=1.5, hr_prompt="a blue square", hr_sampler_name="Euler")
        hires = own.info["toile_records"][0]["hires"]
        assert (hires["prompt"], hires["sampler"]) == ("a blue square", "Euler")
        assert named.info["toile_records"][0]["hires"] == {
            "scale": 2.0, "upscaler": "nearest", "width": 64, "height": 64, "steps": 2,
            "strength": 0.7}


def test_errors_name_the_a1111_field(scripted, tmp_path):
    import requests

    from helpers import gradient_image

    with live_server(scripted, tmp_path / "data") as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1"
        body = {"prompt": "x", "sampler_name": "DDIM", "steps": 2, "width": 32, "height": 32}
        for changes, field in ERROR_CASES:
            response = requests.post(f"{url}/txt2img", json={**body, **changes}, timeout=60)
            assert response.status_code == 422, (changes, response.text)
            assert response.json()["error"]["field"] == field, (changes, response.text)
        init = b64_png(gradient_image(32, 32))
        for changes, field in (
            ({"init_images": ["not base64!"]}, "init_images[0]"),
            ({"init_images": [init, init]}, "init_images"),
            ({"denoising_strength": 0}, "denoising_strength"),
            ({"resize_mode": 2}, "resize_mode"),
            ({"mask": b64_png(gradient_image(8, 8))}, "mask"),
        ):
            response = requests.post(
                f"{url}/img2img", json={**body, "init_images": [init], **changes}, timeout=60
            )
            assert response.status_code == 422, (changes, response.text)
            assert response.json()["error"]["field"] == field, (changes, response.text)
        options = requests.post(f"{url}/options", json={"sd_model_checkpoint": "nope"}, timeout=9)
        assert options.status_code == 422
        assert options.json()["error"]["field"] == "sd_model_checkpoint"
        current = requests.get(f"{url}/options", timeout=9).json()
        assert requests.post(f"{url}/options", json=current, timeout=9).status_code == 200
        changed = requests.post(f"{url}/options", json={"samples_format": "jpg"}, timeout=9)
        assert changed.status_code == 422 and changed.json()["error"]["field"] == "samples_format"
        assert requests.get(f"http://127.0.0.1:{port}/v1/jobs", timeout=9).json()["jobs"] == []


def test_progress_preview_and_interrupt(scripted, tmp_path):
    scripted.gate_at = 2
    with live_server(scripted, tmp_path / "data", preview_every=1) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Default")
        idle = api.get_progress()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
        outcome: dict = {}

        def generate():
            try:
                api.txt2img(prompt="slow", steps=4, width=32, height=32, seed=1)
            except RuntimeError as exc:
                outcome["error"] = exc.args

        thread = threading.Thread(target=generate)
        thread.start()
        assert scripted.reached.wait(60), "the job never reached step 2"
        progress = wait_until(
            lambda: (p := api.get_progress())["state"]["sampling_step"] == 2 and p,
            what="progress at step 2",
        )
        assert progress["progress"] == 0.5 and progress["state"]["sampling_steps"] == 4
        assert progress["state"]["job_count"] == 1 and progress["eta_relative"] >= 0
        assert base64.b64decode(progress["current_image"]).startswith(b"\x89PNG")
        # webuiapi has no parameter for skip_current_image: the query by hand
        skipped = api.session.get(f"{api.baseurl}/progress?skip_current_image=true").json()
        assert skipped["current_image"] is None and skipped["progress"] == 0.5
        api.interrupt()
        scripted.release()
        thread.join(60)
        status, text = outcome["error"]
        assert status == 409 and json.loads(text)["error"]["type"] == "interrupted"
        assert api.get_progress()["state"]["job_count"] == 0
        assert scripted.steps["slow"][-1] == 2  # stopped within one step


def test_webuiapi_defaults_on_the_builtin_model(tmp_path, toile_home):
    """webuiapi's plain ``txt2img(prompt=...)`` — 512×512, sampler "Euler a", 20 steps —
    against a server whose default is the built-in toile-mini: its cascade (64² base, then the
    toile-sr stage) makes the 512×512 image, with the flow "Euler a"."""
    from toile.engine.engine import Engine

    with live_server(Engine(device="cpu", allow_paths=False), tmp_path / "data") as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        result = api.txt2img(prompt="a red circle on a blue background", seed=5)
        assert result.image.size == (512, 512)
        record = json.loads(result.image.info["toile"])
        assert (record["model_id"], record["sampler"]) == ("toile-mini", "Euler a")
        assert [stage["role"] for stage in record["stages"]] == ["base", "upscale", "upscale"]
        assert "Sampler: Euler a" in result.info["infotexts"][0]

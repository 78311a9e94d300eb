"""The web page in headless Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright's
Python package; ``playwright install`` is never used) against a real uvicorn server with the
tiny SD model: generate and see the image, watch live progress with a preview, cancel, paint a
mask and inpaint, "use these settings", the token prompt; the header's live counts from the
server's event stream; Generate, progress and errors on screen at desktop and phone sizes; the
refiner list; the sampler and schedule lists; the LoRA control; the Jobs list and the gallery
from one source, in batch order across a reload."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from serve_helpers import MODEL, ScriptedEngine, live_server, wait_until

pytest.importorskip("fastapi")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/toile_web.png")
TIMEOUT_MS = 60_000
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)",
)


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    """The tiny SD model (the default, which the tests run), and an SDXL base and refiner that
    are only listed: the refiner list is decided from their configs."""
    from serve_helpers import tiny_engine

    engine = tiny_engine(tiny_models("sd"), tmp_path_factory.mktemp("web-registry"))
    engine.registry.add("tiny-sdxl", tiny_models("sdxl"))
    engine.registry.add("tiny-sdxl-refiner", tiny_models("sdxl_refiner"))
    path = engine.registry.path
    path.write_text(json.dumps({**json.loads(path.read_text()), "default": MODEL}))
    return engine


@pytest.fixture(scope="module")
def lora_files(tiny_models, tmp_path_factory):
    from test_lora import make_sd_lora

    root = tmp_path_factory.mktemp("web-loras")
    base = tiny_models("sd")
    return make_sd_lora(base, root / "a", 1), make_sd_lora(base, root / "b", 2)


def open_page(
    browser: Any,
    url: str,
    viewport: tuple[int, int] = (1280, 960),
    requested: list[str] | None = None,
) -> tuple[Any, list[str]]:
    """A page at ``url``; console errors are collected, and with ``requested`` the path of
    every request the page makes, from the first."""
    width, height = viewport
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    if requested is not None:
        page.on("request", lambda request: requested.append(urlsplit(request.url).path))
    page.goto(url)
    return page, errors


def option_values(select: Any) -> list[str]:
    return select.locator("option").evaluate_all("options => options.map(o => o.value)")


def dataset(locator: Any, key: str) -> list[str]:
    return locator.evaluate_all(f"elements => elements.map(e => e.dataset.{key})")


def api_job(url: str, job_id: str) -> dict:
    import requests

    return requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()


def wait_succeeded(url: str, job_id: str) -> dict:
    def ended() -> dict | None:
        job = api_job(url, job_id)
        return job if job["status"] not in ("queued", "running") else None

    job = wait_until(ended, 60, f"job {job_id} to end")
    assert job["status"] == "succeeded", job
    return job


def test_generate_progress_cancel_and_inpaint(engine, browser, tmp_path):
    import requests
    from PIL import Image
    from playwright.sync_api import expect

    from helpers import gradient_image

    scripted = ScriptedEngine(engine)
    data_dir = tmp_path / "data"
    with live_server(scripted, data_dir, preview_every=1) as port:
        url = f"http://127.0.0.1:{port}"
        page, errors = open_page(browser, url)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#model")).to_have_value(MODEL)

        # 1. generate: the image arrives in the gallery with its record
        page.get_by_label("Prompt", exact=True).fill("a red circle")
        page.get_by_label("Steps", exact=True).fill("3")
        page.get_by_label("Seed", exact=True).fill("7")
        page.get_by_role("button", name="Generate").click()
        job = page.locator("#jobs .job").first
        expect(job.locator(".job-status")).to_have_text("Done · 1 image")
        expect(job.locator("progress")).to_have_attribute("value", "3")
        card = page.locator("#gallery .card").first
        expect(card.locator("dl")).to_contain_text("7")
        page.wait_for_function(
            "() => { const img = document.querySelector('#gallery img');"
            " return img && img.complete && img.naturalWidth === 32; }"
        )
        expect(page.locator("#announcer")).to_contain_text("finished")

        # 2. live progress with a preview, then cancel the running job
        scripted.gate_at = 2
        page.get_by_label("Prompt", exact=True).fill("slow")
        page.get_by_label("Steps", exact=True).fill("4")
        page.get_by_role("button", name="Generate").click()
        slow = page.locator("#jobs .job").first
        expect(slow.locator(".job-status")).to_have_text("Step 2 of 4")
        expect(slow.locator("progress")).to_have_attribute("value", "2")
        expect(slow.locator("img.preview")).to_be_visible()
        assert slow.locator("img.preview").get_attribute("src").startswith("data:image/png")
        with page.expect_response(lambda response: response.url.endswith("/cancel")) as sent:
            slow.get_by_role("button", name="Cancel").click()
        assert sent.value.ok and sent.value.json()["status"] == "running"
        scripted.release()  # the next step sees the cancel
        expect(slow.locator(".job-status")).to_have_text("Cancelled")
        assert scripted.steps["slow"][-1] == 2
        scripted.gate_at = None

        # 3. "use these settings" brings the first image's settings back
        card.get_by_role("button", name="Use the settings").click()
        expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red circle")
        expect(page.get_by_label("Seed", exact=True)).to_have_value("7")
        expect(page.get_by_label("Steps", exact=True)).to_have_value("3")

        # 3b. a value the server refuses: its 422 names the field, which is marked and focused
        expect(page.get_by_label("Refiner", exact=True)).to_have_value("")  # no refiner in it
        seed = page.get_by_label("Seed", exact=True)
        seed.fill("-1")
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#form-error")).to_contain_text("seed")
        expect(seed).to_have_attribute("aria-invalid", "true")
        expect(seed).to_be_focused()
        seed.fill("7")

        # 4. paint a mask on the uploaded image and inpaint
        source = tmp_path / "input.png"
        gradient_image(64, 64).save(source)
        page.set_input_files("#image-file", str(source))
        page.get_by_label("Repaint a masked area").check()
        canvas = page.locator("#mask-canvas")
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()  # viewport coordinates: the canvas must be on screen
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + box["width"] * 0.1, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.3, y, steps=5)
        page.mouse.up()
        canvas.focus()  # keyboard painting: the brush starts at the centre
        page.keyboard.press("ArrowRight")
        page.keyboard.press("Space")
        expect(page.locator("#announcer")).to_have_text("Painted at the brush position.")
        page.get_by_label("Prompt", exact=True).fill("a green square")
        page.get_by_label("Steps", exact=True).fill("2")
        # the mask as the page sends it (the server deletes uploads once their job ends)
        with page.expect_request(
            lambda r: r.method == "POST" and urlsplit(r.url).path == "/v1/jobs"
        ) as posted:
            page.get_by_role("button", name="Generate").click()
        expect(page.locator("#gallery .card")).to_have_count(2)
        newest = requests.get(f"{url}/v1/jobs?status=succeeded", timeout=9).json()["jobs"][-1]
        assert newest["request"]["mask"] is True and newest["request"]["image"] is True
        assert newest["images"][0]["record"]["mode"] == "inpaint"
        sent = json.loads(posted.value.post_data)["mask"].split(",")[-1]
        mask = Image.open(io.BytesIO(base64.b64decode(sent))).convert("L")
        assert mask.size == (64, 64)
        assert mask.getpixel((13, 32)) == 255  # painted: repaint
        assert mask.getpixel((34, 32)) == 255  # painted with the keyboard
        assert mask.getpixel((50, 32)) == 0 and mask.getpixel((13, 5)) == 0  # not painted: keep
        expect(page.locator("#gallery .card").first.locator("dl")).to_contain_text("inpaint")

        page.screenshot(path=str(SCREENSHOT), full_page=True)
        # The browser logs the deliberate 422 of step 3b; nothing else may fail.
        assert [error for error in errors if "422" not in error] == []
        assert len(errors) <= 1, errors
        page.close()


def test_token_is_asked_for_and_sent(engine, browser, tmp_path):
    from playwright.sync_api import expect

    token = "web-page-token-123"
    with live_server(ScriptedEngine(engine), tmp_path / "data", api_token=token) as port:
        url = f"http://127.0.0.1:{port}"
        page, errors = open_page(browser, url)
        dialog = page.get_by_role("dialog", name="API token")
        expect(dialog).to_be_visible()
        page.get_by_label("Token", exact=True).fill("wrong-token-000")
        page.get_by_role("button", name="Use this token").click()
        expect(page.locator("#token-error")).to_have_text("That token was not accepted.")
        page.get_by_label("Token", exact=True).fill(token)
        page.get_by_role("button", name="Use this token").click()
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#model")).to_have_value(MODEL)
        assert page.evaluate("sessionStorage.getItem('toile.token')") == token
        page.close()
        # the 401 answers to the wrong token are the only console errors
        assert all("401" in error for error in errors), errors


def test_header_follows_the_server_event_stream(engine, browser, tmp_path):
    """The header's counts come from ``/v1/events`` as jobs are queued, start and end, also
    for another client's job, and /health is never polled while the stream is up. (A keepalive
    far beyond the test's waits: only job changes can have updated the header.)"""
    import requests
    from playwright.sync_api import expect

    scripted = ScriptedEngine(engine)
    scripted.gate_at = 1
    requested: list[str] = []
    with live_server(scripted, tmp_path / "data", sse_keepalive_s=600) as port:
        url = f"http://127.0.0.1:{port}"
        page, errors = open_page(browser, url, requested=requested)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        header = page.locator("#server-status")
        expect(header).to_have_text("Ready · 0 running · 0 queued")

        page.get_by_label("Prompt", exact=True).fill("held")
        page.get_by_label("Steps", exact=True).fill("2")
        page.get_by_role("button", name="Generate").click()
        expect(header).to_have_text("Ready · 1 running · 0 queued")
        assert scripted.reached.wait(30)
        body = {"prompt": "from another client", "model": MODEL, "steps": 2, "seed": 1}
        other = requests.post(f"{url}/v1/jobs", json=body, timeout=30)
        assert other.status_code == 202, other.text
        expect(header).to_have_text("Ready · 1 running · 1 queued")

        scripted.release()
        expect(header).to_have_text("Ready · 0 running · 0 queued")
        wait_succeeded(url, other.json()["id"])
        assert "/v1/events" in requested
        assert "/health" not in requested, requested
        assert errors == []
        page.close()


def test_generate_and_feedback_stay_on_screen_and_a_phone_never_scrolls_sideways(
    engine, browser, tmp_path
):
    """1280x900: Generate is visible without scrolling, and a refused field's error is on
    screen after the click. 390 px wide: the new job's progress is scrolled into view after
    the click, and once it is done (long prompt, image, record) nothing overflows sideways."""
    from playwright.sync_api import expect

    with live_server(ScriptedEngine(engine), tmp_path / "data") as port:
        url = f"http://127.0.0.1:{port}"
        page, errors = open_page(browser, url, viewport=(1280, 900))
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        generate = page.get_by_role("button", name="Generate")
        expect(generate).to_be_in_viewport(ratio=1)
        assert page.evaluate("window.scrollY") == 0
        page.get_by_label("Prompt", exact=True).fill("a red circle")
        seed = page.get_by_label("Seed", exact=True)
        seed.fill("-1")
        generate.click()
        error = page.locator("#form-error")
        expect(error).to_contain_text("seed")
        expect(error).to_be_in_viewport(ratio=1)
        expect(seed).to_be_focused()
        page.close()

        page, errors = open_page(browser, url, viewport=(390, 844))
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        generate = page.get_by_role("button", name="Generate")
        expect(generate).to_be_in_viewport(ratio=1)
        prompt = "a small red circle above a large blue square beside a green triangle " * 3
        page.get_by_label("Prompt", exact=True).fill(prompt)
        page.get_by_label("Steps", exact=True).fill("2")
        page.get_by_label("Seed", exact=True).fill("3")
        assert page.evaluate("window.scrollY") == 0  # the form's top: the Jobs list is below
        generate.click()
        job = page.locator("#jobs .job").first
        expect(job).to_be_in_viewport()
        expect(job.locator(".job-status")).to_have_text("Done · 1 image")
        expect(page.locator("#gallery .card")).to_have_count(1)
        page.wait_for_function(
            "() => { const img = document.querySelector('#gallery img');"
            " return img && img.complete && img.naturalWidth > 0; }"
        )
        page.locator("#gallery .card summary").click()  # the record's JSON, opened
        width = page.evaluate(
            "() => { const s = document.scrollingElement;"
            " return {scroll: s.scrollWidth, client: s.clientWidth}; }"
        )
        assert width["scroll"] <= width["client"], width
        # nor sideways inside a panel (a list that scrolls, or a box past its panel's edge)
        sticking_out = page.evaluate(
            """() => [...document.querySelectorAll(".panel *")]
                .filter((e) => e.getBoundingClientRect().right
                               > e.closest(".panel").getBoundingClientRect().right + 0.5)
                .map((e) => `${e.tagName}.${e.className}`)"""
        )
        assert sticking_out == []
        assert errors == []
        page.close()


def test_refiner_list_offers_only_models_that_can_refine_the_chosen_one(
    engine, browser, tmp_path
):
    from playwright.sync_api import expect

    with live_server(ScriptedEngine(engine), tmp_path / "data") as port:
        page, errors = open_page(browser, f"http://127.0.0.1:{port}")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        model = page.get_by_label("Model", exact=True)
        refiner = page.get_by_label("Refiner", exact=True)
        expect(model).to_have_value(MODEL)
        assert option_values(model) == ["toile-mini", MODEL, "tiny-sdxl", "tiny-sdxl-refiner"]
        assert option_values(refiner) == [""]  # SD has no refiner hand-off
        expect(refiner).to_be_disabled()
        expect(page.get_by_label("Switch at", exact=True)).to_be_disabled()

        model.select_option("tiny-sdxl")
        expect(refiner).to_be_enabled()
        assert option_values(refiner) == ["", "tiny-sdxl-refiner"]
        refiner.select_option("tiny-sdxl-refiner")
        model.select_option(MODEL)  # a refiner that no longer fits is dropped
        expect(refiner).to_have_value("")
        expect(refiner).to_be_disabled()
        assert errors == []
        page.close()


def test_sampler_and_schedule_lists_follow_the_model_and_sampler(engine, browser, tmp_path):
    """The Sampler list offers "Default (the model's own)" and what the chosen model can use,
    the Schedule list automatic and what the chosen sampler supports there; a choice that no
    longer applies goes back to the default. A chosen pair is sent, run, recorded, shown on the
    card and restored by "use these settings"; Default sends nothing; a 422 naming the schedule
    marks that list."""
    from playwright.sync_api import expect

    with live_server(ScriptedEngine(engine), tmp_path / "data") as port:
        url = f"http://127.0.0.1:{port}"
        page, errors = open_page(browser, url)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        model = page.get_by_label("Model", exact=True)
        sampler = page.get_by_label("Sampler", exact=True)
        schedule = page.get_by_label("Schedule", exact=True)
        expect(model).to_have_value(MODEL)

        # the tiny SD model: its own is DDIM; the ε samplers; DDIM's own spacing options
        names = option_values(sampler)
        assert names[0] == "" and {"DDIM", "Euler", "Euler a", "DPM++ 2M"} <= set(names[1:])
        expect(sampler.locator("option").first).to_have_text("Default (DDIM)")
        expect(sampler).to_have_value("")
        expect(schedule).to_have_value("automatic")
        assert "karras" not in option_values(schedule)  # DDIM has no Karras sigmas

        # toile's own model: exactly what its sampling code runs, no schedule choice
        model.select_option("toile-mini")
        assert option_values(sampler) == ["", "Euler", "Euler a", "Heun", "DPM++ 2M", "UniPC"]
        expect(sampler.locator("option").first).to_have_text("Default (Euler)")
        assert option_values(schedule) == ["automatic"]
        expect(schedule).to_be_disabled()

        model.select_option(MODEL)
        sampler.select_option("DPM++ 2M")
        expect(schedule).to_be_enabled()
        assert option_values(schedule)[0] == "automatic" and "karras" in option_values(schedule)
        schedule.select_option("karras")
        # toile-mini samples with DPM++ 2M too (kept) but has no Karras schedule (back to its own)
        model.select_option("toile-mini")
        expect(sampler).to_have_value("DPM++ 2M")
        expect(schedule).to_have_value("automatic")
        sampler.select_option("Heun")  # a sampler the tiny SD model's menu also has
        model.select_option(MODEL)
        expect(sampler).to_have_value("Heun")
        model.select_option(MODEL)
        sampler.select_option("DPM++ 2M")
        schedule.select_option("karras")

        def generate(prompt: str) -> tuple[dict, str]:
            """The body the page sent, and the id of the job, once its card is done."""
            page.get_by_label("Prompt", exact=True).fill(prompt)
            page.get_by_label("Steps", exact=True).fill("2")
            page.get_by_label("Seed", exact=True).fill("5")
            with page.expect_response(
                lambda r: r.request.method == "POST" and urlsplit(r.url).path == "/v1/jobs"
            ) as answered:
                page.get_by_role("button", name="Generate").click()
            assert answered.value.status == 202, answered.value.text()
            job_id = answered.value.json()["id"]
            job = page.locator(f'#jobs .job[data-job="{job_id}"]')
            expect(job.locator(".job-status")).to_have_text("Done · 1 image")
            expect(page.locator(f'#gallery .card[data-job="{job_id}"]')).to_have_count(1)
            return answered.value.request.post_data_json, job_id

        payload, job_id = generate("karras spaced")
        chosen = {key: payload[key] for key in ("sampler", "schedule") if key in payload}
        assert chosen == {"sampler": "DPM++ 2M", "schedule": "karras"}
        job = wait_succeeded(url, job_id)
        assert (job["request"]["sampler"], job["request"]["schedule"]) == ("DPM++ 2M", "karras")
        record = job["images"][0]["record"]
        assert (record["sampler"], record["schedule"]) == ("DPM++ 2M", "karras")
        karras_card = page.locator(f'#gallery .card[data-job="{job_id}"]')
        expect(karras_card.locator("dl")).to_contain_text("SamplerDPM++ 2M")
        expect(karras_card.locator("dl")).to_contain_text("ScheduleKarras")

        # a sampler without Karras sigmas: the schedule goes back to automatic
        sampler.select_option("DDIM")
        expect(schedule).to_have_value("automatic")
        assert "karras" not in option_values(schedule)

        # Default: no sampler (and, automatic, no schedule) in the request
        sampler.select_option("")
        payload, plain_id = generate("own sampler")
        assert "sampler" not in payload and "schedule" not in payload, payload
        plain_card = page.locator(f'#gallery .card[data-job="{plain_id}"]')
        expect(plain_card.locator("dl")).to_contain_text("SamplerDDIM")
        expect(plain_card.locator("dl")).not_to_contain_text("Schedule")

        karras_card.get_by_role("button", name="Use the settings").click()
        expect(sampler).to_have_value("DPM++ 2M")
        expect(schedule).to_have_value("karras")
        plain_card.get_by_role("button", name="Use the settings").click()
        expect(sampler).to_have_value("")
        expect(schedule).to_have_value("automatic")

        # a schedule the server refuses (forced into the list): its 422 marks the Schedule list
        sampler.select_option("DDIM")
        page.evaluate(
            """() => { const s = document.querySelector("#schedule");
                       s.add(new Option("Karras", "karras")); s.value = "karras"; }"""
        )
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#form-error")).to_contain_text("schedule")
        expect(schedule).to_have_attribute("aria-invalid", "true")
        expect(schedule).to_be_focused()
        assert [error for error in errors if "422" not in error] == []
        assert len(errors) <= 1, errors
        page.close()


def test_lora_control_sends_ids_and_scales(engine, browser, lora_files, tmp_path):
    """Each LoRA id of the server with a checkbox and a scale (1.0 by default); the chosen
    ones go in the request as ``loras: [{id, scale}]``, are applied, shown on the card, and
    come back with "use these settings"."""
    from playwright.sync_api import expect

    first, second = lora_files
    loras = {"sks": first, "zeta": second}
    with live_server(ScriptedEngine(engine), tmp_path / "data", loras=loras) as port:
        url = f"http://127.0.0.1:{port}"
        page, errors = open_page(browser, url)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#loras-empty")).to_be_hidden()
        assert dataset(page.locator("#loras .lora"), "lora") == ["sks", "zeta"]
        use_sks = page.get_by_label("sks", exact=True)
        sks_scale = page.get_by_label("Scale of sks", exact=True)
        zeta_scale = page.get_by_label("Scale of zeta", exact=True)
        expect(use_sks).not_to_be_checked()
        expect(sks_scale).to_have_value("1.0")
        expect(sks_scale).to_be_disabled()

        def generate(prompt: str) -> dict:
            page.get_by_label("Prompt", exact=True).fill(prompt)
            page.get_by_label("Steps", exact=True).fill("2")
            page.get_by_label("Seed", exact=True).fill("5")
            with page.expect_request(
                lambda r: r.method == "POST" and urlsplit(r.url).path == "/v1/jobs"
            ) as sent:
                page.get_by_role("button", name="Generate").click()
            expect(page.locator("#jobs .job").first.locator(".job-status")).to_have_text(
                "Done · 1 image"
            )
            return sent.value.post_data_json

        use_sks.check()
        sks_scale.fill("0.5")
        page.get_by_label("zeta", exact=True).check()
        expect(zeta_scale).to_be_enabled()
        payload = generate("styled")
        assert payload["loras"] == [{"id": "sks", "scale": 0.5}, {"id": "zeta", "scale": 1.0}]
        job_id = page.locator("#jobs .job").first.get_attribute("data-job")
        job = wait_succeeded(url, job_id)
        assert job["request"]["loras"] == payload["loras"]
        assert [lora["scale"] for lora in job["images"][0]["record"]["loras"]] == [0.5, 1.0]
        styled_card = page.locator(f'#gallery .card[data-job="{job_id}"]')
        expect(styled_card.locator("dl")).to_contain_text("sks × 0.5, zeta × 1")

        use_sks.uncheck()
        page.get_by_label("zeta", exact=True).uncheck()
        assert "loras" not in generate("plain")

        styled_card.get_by_role("button", name="Use the settings").click()
        expect(use_sks).to_be_checked()
        expect(sks_scale).to_have_value("0.5")
        expect(page.get_by_label("zeta", exact=True)).to_be_checked()
        expect(zeta_scale).to_have_value("1")
        assert errors == []
        page.close()


def test_jobs_and_gallery_agree_and_keep_batch_order_across_a_reload(engine, browser, tmp_path):
    """Both panels show the same jobs (one made by another client before the page opened
    included), and a batch's images stay in index order in the gallery, before and after a
    reload."""
    import requests
    from playwright.sync_api import expect

    with live_server(ScriptedEngine(engine), tmp_path / "data") as port:
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "from elsewhere", "model": MODEL, "steps": 2, "seed": 11}
        other = requests.post(f"{url}/v1/jobs", json=body, timeout=30).json()["id"]
        other_images = [image["id"] for image in wait_succeeded(url, other)["images"]]

        page, errors = open_page(browser, url)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        jobs, cards = page.locator("#jobs .job"), page.locator("#gallery .card")
        expect(jobs).to_have_count(1)
        expect(page.locator("#jobs-empty")).to_be_hidden()
        expect(jobs.first.locator(".job-status")).to_have_text("Done · 1 image")
        expect(cards).to_have_count(1)
        assert dataset(cards, "job") == [other]

        page.get_by_label("Prompt", exact=True).fill("a pair")
        page.get_by_label("Steps", exact=True).fill("2")
        page.get_by_label("Seed", exact=True).fill("3")
        page.get_by_label("Images", exact=True).fill("2")
        page.get_by_role("button", name="Generate").click()
        expect(jobs.first.locator(".job-status")).to_have_text("Done · 2 images")
        pair = jobs.first.get_attribute("data-job")
        pair_images = [image["id"] for image in api_job(url, pair)["images"]]
        expect(cards).to_have_count(3)

        def shown() -> tuple[list[str], list[str]]:
            return dataset(jobs, "job"), dataset(cards, "image")

        expected = ([pair, other], pair_images + other_images)
        assert shown() == expected
        seeds = page.locator("#gallery .card dl").evaluate_all(
            "lists => lists.map(l => l.textContent)"
        )
        assert "Seed3" in seeds[0] and "Seed4" in seeds[1]  # a batch's seeds count up

        page.reload()
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(cards).to_have_count(3)
        assert shown() == expected
        expect(jobs.first.locator(".job-status")).to_have_text("Done · 2 images")
        assert errors == []
        page.close()


def test_hires_fix_controls(engine, browser, tmp_path):
    """The folded Hires fix section: a scale and an upscaler (the server's upscale models)
    go in the request as hires_*, the image comes back at the hires size, the card says so,
    and "use these settings" opens the section with the values back."""
    from playwright.sync_api import expect

    with live_server(ScriptedEngine(engine), tmp_path / "data") as port:
        url = f"http://127.0.0.1:{port}"
        page, errors = open_page(browser, url)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        assert option_values(page.locator("#hires_upscaler")) == [
            "toile-sr", "lanczos", "bicubic", "nearest"]
        page.locator("#hires summary").click()
        page.get_by_label("Prompt", exact=True).fill("a red circle")
        page.get_by_label("Steps", exact=True).fill("2")
        page.get_by_label("Seed", exact=True).fill("3")
        page.get_by_label("Upscale by").fill("2")
        page.get_by_label("Hires upscaler").select_option("nearest")
        page.get_by_label("Hires strength").fill("0.5")
        with page.expect_request(
            lambda r: r.method == "POST" and urlsplit(r.url).path == "/v1/jobs"
        ) as sent:
            page.get_by_role("button", name="Generate").click()
        payload = sent.value.post_data_json
        assert (payload["hires_scale"], payload["hires_upscaler"], payload["hires_strength"]) == (
            2, "nearest", 0.5)
        expect(page.locator("#jobs .job").first.locator(".job-status")).to_have_text(
            "Done · 1 image")
        job_id = page.locator("#jobs .job").first.get_attribute("data-job")
        job = wait_succeeded(url, job_id)
        record = job["images"][0]["record"]
        assert record["hires"]["upscaler"] == "nearest"
        width, height = record["hires"]["width"], record["hires"]["height"]
        assert (width, height) == (record["width"] * 2, record["height"] * 2)
        card = page.locator(f'#gallery .card[data-job="{job_id}"]')
        expect(card.locator("dl")).to_contain_text("×2 with nearest")
        page.get_by_label("Upscale by").fill("")
        page.locator("#hires summary").click()  # fold it again
        card.get_by_role("button", name="Use the settings").click()
        expect(page.get_by_label("Upscale by")).to_have_value("2")
        expect(page.get_by_label("Hires upscaler")).to_have_value("nearest")
        assert errors == []
        page.close()

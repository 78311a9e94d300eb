"""The web page in headless Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright's
Python package; ``playwright install`` is never used) against a real uvicorn server with the
tiny SD model: generate and see the image, watch live progress with a preview, cancel, paint a
mask and inpaint, "use these settings", and the token prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serve_helpers import MODEL, ScriptedEngine, live_server

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
    from serve_helpers import tiny_engine

    engine = tiny_engine(tiny_models("sd"), tmp_path_factory.mktemp("web-registry"))
    path = engine.registry.path
    path.write_text(json.dumps({**json.loads(path.read_text()), "default": MODEL}))
    return engine


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1280, "height": 960})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.goto(url)
    return page, errors


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

        # 3b. a refiner the model cannot hand off to: the server's 422 names the field
        refiner = page.get_by_label("Refiner", exact=True)
        expect(refiner).to_have_value("")  # the record had no refiner
        refiner.select_option(MODEL)
        page.get_by_label("Switch at", exact=True).fill("0.7")
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#form-error")).to_contain_text("has no refiner hand-off")
        expect(refiner).to_have_attribute("aria-invalid", "true")
        refiner.select_option("")

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
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#gallery .card")).to_have_count(2)
        newest = requests.get(f"{url}/v1/jobs?status=succeeded", timeout=9).json()["jobs"][-1]
        assert newest["request"]["mask"] is True and newest["request"]["image"] is True
        assert newest["images"][0]["record"]["mode"] == "inpaint"
        mask = Image.open(data_dir / "uploads" / f"{newest['id']}-mask.png").convert("L")
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

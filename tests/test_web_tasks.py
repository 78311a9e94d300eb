"""The web page's task tabs in headless Chromium (Debian's ``/usr/bin/chromium`` driven by
Playwright, as in test_web_page.py) against a real uvicorn server: upscale an uploaded image
with lanczos, caption it with a tiny BLIP (the text the engine gives), ask a tiny BLIP VQA a
question, edit it with a tiny InstructPix2Pix; a bad scale and an empty question shown as one
line naming the field, the page working on after them; each tab's model picker listing only the
models that serve its task; the tabs at a phone's width and a desktop's height."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from serve_helpers import ScriptedEngine, live_server
from test_web_page import (
    CHROMIUM,
    api_job,
    open_page,
    option_values,
    wait_succeeded,
)

pytest.importorskip("fastapi")

CAPTIONER = "tiny-blip"
ANSWERER = "tiny-blip-vqa"
EDITOR = "tiny-ip2p"
# the built-in SR stage and resampling filters
UPSCALERS = ["toile-sr", "lanczos", "bicubic", "nearest"]
pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install "
        "chromium)",
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    """An id-only engine with the built-in toile-mini and upscalers, and a tiny model for each
    other task: a BLIP captioner, a BLIP question answerer, an InstructPix2Pix editor."""
    from toile.engine.engine import Engine
    from toile.engine.models import ModelRegistry

    registry = ModelRegistry(tmp_path_factory.mktemp("web-tasks-registry") / "models.json")
    registry.add(CAPTIONER, tiny_models("blip"))
    registry.add(ANSWERER, tiny_models("blip_vqa"))
    registry.add(EDITOR, tiny_models("sd_ip2p"))
    return Engine(registry, device="cpu", allow_paths=False)


def picture(path: Path, width: int, height: int) -> Path:
    from helpers import gradient_image

    gradient_image(width, height).save(path)
    return path


def is_job_post(response: Any) -> bool:
    return response.request.method == "POST" and urlsplit(response.url).path == "/v1/jobs"


def loaded_size(page: Any, job_id: str) -> dict:
    """The natural size of the job's gallery image, once the browser has decoded it."""
    selector = f'#gallery .card[data-job="{job_id}"] img'
    page.wait_for_function(
        f"() => {{ const img = document.querySelector('{selector}');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )
    return page.locator(selector).evaluate(
        "img => ({width: img.naturalWidth, height: img.naturalHeight})"
    )


def one_line_error(page: Any, selector: str, field: str) -> str:
    """The error under a form: one message, on one line of text, that names ``field``."""
    from playwright.sync_api import expect

    line = page.locator(selector)
    expect(line).to_contain_text(field)
    assert line.locator("*").count() == 0  # plain text, not a list of problems
    text = line.text_content()
    assert "\n" not in text.strip(), text
    return text


def test_each_tab_runs_its_task_and_offers_only_its_models(engine, browser, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    from toile.request import Detail, GenerationRequest, Task

    small = picture(tmp_path / "small.png", 16, 12)
    square = picture(tmp_path / "square.png", 32, 32)
    # What the engine itself writes for this image (a caption has no seed to vary it): the
    # page must show exactly this. Run before the server's worker shares the engine.
    with Image.open(square) as image:
        expected_caption = engine.run(
            GenerationRequest(prompt="", task=Task.CAPTION, image=image.convert("RGB"),
                              model=CAPTIONER, detail=Detail.SHORT)
        ).texts[0]

    with live_server(ScriptedEngine(engine), tmp_path / "data") as port:
        url = f"http://127.0.0.1:{port}"
        page, errors = open_page(browser, url)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")

        # every picker lists exactly the models whose card names its task
        assert option_values(page.get_by_label("Model", exact=True)) == ["toile-mini"]
        assert option_values(page.get_by_label("Edit model")) == [EDITOR]
        # toile's own reader is built in; the one registered captioner is the task default
        assert option_values(page.get_by_label("Caption model")) == ["toile-reader", CAPTIONER]
        assert option_values(page.get_by_label("Answer model")) == ["toile-reader", ANSWERER]
        assert option_values(page.get_by_label("Upscaler", exact=True)) == UPSCALERS
        expect(page.locator("#edit-form")).to_be_hidden()

        # ---- Upscale: a 16x12 image twice as large with lanczos
        page.get_by_role("tab", name="Upscale").click()
        expect(page.locator("#upscale-form")).to_be_visible()
        expect(page.locator("#generate-form")).to_be_hidden()
        page.set_input_files("#upscale-image", str(small))
        expect(page.locator("#upscale-preview figcaption")).to_contain_text("16 × 12 px")
        upscaler = page.get_by_label("Upscaler", exact=True)
        expect(upscaler).to_have_value("toile-sr")  # the upscale task's default
        upscaler.select_option("lanczos")
        scale = page.get_by_label("Scale factor")
        scale.fill("2")
        expect(page.locator("#upscale-size")).to_have_text("16 × 12 px becomes 32 × 24 px.")
        expect(page.get_by_label("Prompt (optional)")).to_be_disabled()  # a filter has none
        upscale = page.get_by_role("button", name="Upscale", exact=True)
        with page.expect_response(is_job_post) as answered:
            upscale.click()
        assert answered.value.status == 202, answered.value.text()
        sent = answered.value.request.post_data_json
        assert {key: sent[key] for key in ("task", "model", "scale")} == {
            "task": "upscale", "model": "lanczos", "scale": 2}
        assert sent["image"].startswith("data:image/png;base64,") and "prompt" not in sent
        upscaled = answered.value.json()["id"]
        job = page.locator(f'#jobs .job[data-job="{upscaled}"]')
        expect(job.locator(".job-status")).to_have_text("Done · 1 image")
        expect(job.locator(".job-title")).to_have_text("Upscale ×2 · lanczos")
        assert loaded_size(page, upscaled) == {"width": 32, "height": 24}
        card = page.locator(f'#gallery .card[data-job="{upscaled}"]')
        expect(card.locator(".card-prompt")).to_have_text("Upscaled ×2")
        expect(card.locator("dl")).to_contain_text("Size32×24")
        expect(card.locator("dl")).not_to_contain_text("Steps")  # a filter runs none

        # a scale past 8: the server's 422, one line naming the field, which is marked
        scale.fill("9")
        upscale.click()
        text = one_line_error(page, "#upscale-error", "scale")
        assert text.startswith("scale"), text
        expect(scale).to_have_attribute("aria-invalid", "true")
        expect(scale).to_be_focused()
        # ... and the next request works: another filter, three times larger
        scale.fill("3")
        upscaler.select_option("nearest")
        with page.expect_response(is_job_post) as answered:
            upscale.click()
        thrice = answered.value.json()["id"]
        expect(page.locator("#upscale-error")).to_be_empty()
        expect(scale).not_to_have_attribute("aria-invalid", "true")
        expect(page.locator(f'#jobs .job[data-job="{thrice}"] .job-status')).to_have_text(
            "Done · 1 image")
        assert loaded_size(page, thrice) == {"width": 48, "height": 36}

        # ---- Caption & Ask: the caption, as the engine writes it, in the tab and the list
        page.get_by_role("tab", name="Caption & Ask").click()
        page.set_input_files("#read-image", str(square))
        expect(page.locator("#read-preview")).to_be_visible()
        with page.expect_response(is_job_post) as answered:
            page.get_by_role("button", name="Caption", exact=True).click()
        assert answered.value.request.post_data_json["detail"] == "short"
        captioned = answered.value.json()["id"]
        job = page.locator(f'#jobs .job[data-job="{captioned}"]')
        expect(job.locator(".job-status")).to_have_text("Done · caption")
        expect(page.locator("#read-result-heading")).to_have_text("Caption")
        expect(page.locator("#read-output")).not_to_have_text("Working…")
        assert page.locator("#read-output").text_content() == expected_caption
        assert job.locator(".job-text").text_content() == expected_caption
        assert wait_succeeded(url, captioned)["texts"][0]["text"] == expected_caption
        expect(page.locator(f'#gallery .card[data-job="{captioned}"]')).to_have_count(0)

        # Ask with no question: one line naming it, nothing sent; then a real question
        posted: list[str] = []
        page.on("request", lambda r: r.method == "POST" and posted.append(r.url))
        question = page.get_by_label("Question", exact=True)
        page.get_by_role("button", name="Ask", exact=True).click()
        one_line_error(page, "#read-error", "question")
        expect(question).to_have_attribute("aria-invalid", "true")
        expect(question).to_be_focused()
        assert posted == []
        question.fill("what colour is it?")
        with page.expect_response(is_job_post) as answered:
            question.press("Enter")  # Enter in the box asks
        assert answered.value.status == 202, answered.value.text()
        asked = answered.value.json()["id"]
        expect(page.locator("#read-error")).to_be_empty()
        job = page.locator(f'#jobs .job[data-job="{asked}"]')
        expect(job.locator(".job-status")).to_have_text("Done · answer")
        expect(job.locator(".job-title")).to_have_text("Ask: what colour is it?")
        answer = wait_succeeded(url, asked)["texts"][0]
        assert (answer["record"]["question"], answer["record"]["model_id"]) == (
            "what colour is it?", ANSWERER)
        expect(page.locator("#read-result-heading")).to_have_text("Answer")
        expect(page.locator("#read-question")).to_have_text("Q: what colour is it?")
        expect(page.locator("#read-output")).not_to_have_text("Working…")
        assert page.locator("#read-output").text_content() == answer["text"]
        assert job.locator(".job-text").text_content() == answer["text"]

        # ---- Edit: the instruction on the image, two steps
        page.get_by_role("tab", name="Edit").click()
        page.set_input_files("#edit-image", str(square))
        page.get_by_label("Instruction").fill("make it blue")
        page.get_by_label("Edit Steps").fill("2")
        page.get_by_label("Edit Seed").fill("3")
        page.get_by_label("Image guidance").fill("1.2")
        with page.expect_response(is_job_post) as answered:
            page.get_by_role("button", name="Apply edit").click()
        assert answered.value.status == 202, answered.value.text()
        edited = answered.value.json()["id"]
        expect(page.locator(f'#jobs .job[data-job="{edited}"] .job-status')).to_have_text(
            "Done · 1 image")
        assert loaded_size(page, edited) == {"width": 32, "height": 32}
        record = wait_succeeded(url, edited)["images"][0]["record"]
        assert (record["task"], record["model_id"], record["prompt"]) == (
            "edit", EDITOR, "make it blue")
        assert (record["steps"], record["seed"], record["image_guidance"]) == (2, 3, 1.2)
        card = page.locator(f'#gallery .card[data-job="{edited}"]')
        expect(card.locator(".card-prompt")).to_have_text("Edited: make it blue")
        expect(card.locator("dl")).to_contain_text("Image guidance1.2")

        # "use these settings" on the upscale goes back to its tab with its values
        page.locator(f'#gallery .card[data-job="{upscaled}"]').get_by_role(
            "button", name="Use the settings").click()
        expect(page.locator("#upscale-form")).to_be_visible()
        expect(scale).to_have_value("2")
        expect(upscaler).to_have_value("lanczos")

        # the gallery holds the three images, newest first; the Jobs list all five jobs
        assert page.locator("#gallery .card").evaluate_all(
            "cards => cards.map(c => c.dataset.job)") == [edited, thrice, upscaled]
        assert page.locator("#jobs .job").evaluate_all(
            "jobs => jobs.map(j => j.dataset.job)") == [edited, asked, captioned, thrice, upscaled]
        assert api_job(url, upscaled)["request"]["task"] == "upscale"

        # after a reload the text results are still text in the Jobs list
        page.reload()
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        reloaded = page.locator(f'#jobs .job[data-job="{captioned}"]')
        expect(reloaded.locator(".job-status")).to_have_text("Done · caption")
        assert reloaded.locator(".job-text").text_content() == expected_caption
        expect(page.locator("#gallery .card")).to_have_count(3)
        assert [error for error in errors if "422" not in error] == [], errors
        assert len(errors) <= 1, errors  # the one refused scale
        page.close()


def test_task_tabs_fit_a_phone_and_a_desktop_screen(engine, browser, tmp_path):
    """At 390 px nothing scrolls sideways, whichever tab is shown (the tabs wrap); at
    1280x900 each tab's button is on screen without scrolling. Arrow keys move between tabs."""
    from playwright.sync_api import expect

    tabs = ["Generate", "Edit", "Caption & Ask", "Upscale"]
    buttons = ["Generate", "Apply edit", "Caption", "Upscale"]
    with live_server(ScriptedEngine(engine), tmp_path / "data") as port:
        url = f"http://127.0.0.1:{port}"
        page, errors = open_page(browser, url, viewport=(390, 844))
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        page.set_input_files("#upscale-image", str(picture(tmp_path / "in.png", 640, 480)))
        for name in tabs:
            tab = page.get_by_role("tab", name=name)
            tab.click()
            expect(tab).to_have_attribute("aria-selected", "true")
            expect(tab).to_be_in_viewport(ratio=1)
            width = page.evaluate(
                "() => { const s = document.scrollingElement;"
                " return {scroll: s.scrollWidth, client: s.clientWidth}; }"
            )
            assert width["scroll"] <= width["client"], (name, width)
            sticking_out = page.evaluate(
                """() => [...document.querySelectorAll(".panel *")]
                    .filter((e) => e.getBoundingClientRect().right
                                   > e.closest(".panel").getBoundingClientRect().right + 0.5)
                    .map((e) => `${e.tagName}.${e.className}#${e.id}`)"""
            )
            assert sticking_out == [], (name, sticking_out)

        # the tabs from the keyboard: arrows move along them (and wrap), Home goes first
        page.get_by_role("tab", name="Upscale").focus()
        page.keyboard.press("ArrowRight")
        expect(page.get_by_role("tab", name="Generate")).to_be_focused()
        expect(page.locator("#generate-form")).to_be_visible()
        page.keyboard.press("ArrowLeft")
        expect(page.get_by_role("tab", name="Upscale")).to_have_attribute("aria-selected", "true")
        page.keyboard.press("Home")
        expect(page.get_by_role("tab", name="Generate")).to_have_attribute(
            "aria-selected", "true")
        page.close()

        page, errors2 = open_page(browser, url, viewport=(1280, 900))
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        for name, button in zip(tabs, buttons, strict=True):
            page.get_by_role("tab", name=name).click()
            expect(page.get_by_role("button", name=button, exact=True)).to_be_in_viewport(
                ratio=1)
            assert page.evaluate("window.scrollY") == 0, name
        assert errors == [] and errors2 == []
        page.close()

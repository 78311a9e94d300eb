"""Shared fixtures: an isolated toile home, and tiny model folders built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: one thread beats two fighting over shared cores (measured: 69 s -> 8.5 s for the
# SDXL tests on a loaded 2-core machine). Subprocesses (CLI tests) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The invisible watermark (on by default for users) changes every pixel a little; the suite
# compares pixels with diffusers and checks that inpainting keeps unmasked pixels exactly, so it
# runs unmarked. tests/test_watermark.py turns it on, and checks that it is on by default.
os.environ["TOILE_WATERMARK"] = "0"


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def toile_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("toile-home")
    monkeypatch.setenv("TOILE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """Build a family's tiny folder on first use: ``tiny_models("sd") -> Path``."""
    from fixtures.models import BUILDERS

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = BUILDERS[name](root / name)
        return built[name]

    return get


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine every op of a
    multi-threaded torch waits at OpenMP barriers for a sibling thread that is descheduled.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random sentence encoder folder for toile models, built once."""
    from toile.families.toile.testing import tiny_text_encoder

    return tiny_text_encoder(tmp_path_factory.mktemp("tiny-text"))


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (never a downloaded browser), one per module:
    the web page tests share it."""
    from playwright.sync_api import expect, sync_playwright

    from test_web_page import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()

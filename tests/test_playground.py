"""End-to-end: the playground page in headless Chromium (Debian's package) via Playwright."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tiny
from helpers import random_vector, start_server

from steerlab.formats import save_vector
from steerlab.serving.app import Limits, create_app, load_vectors

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    lm = tiny.model("llama")
    vdir = tmp_path_factory.mktemp("vectors")
    save_vector(random_vector(lm, [1, 2], seed=4, scale=2.0), vdir / "joy.safetensors")
    app = create_app(lm, load_vectors(vdir, lm), Limits(max_tokens=64))
    base, stop = start_server(app)
    yield base + "/"
    stop()


def test_slider_changes_the_steered_output(url):
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            page.goto(url)
            page.wait_for_function("document.getElementById('status').textContent === 'ready'")
            page.fill("#max-tokens", "16")
            page.click("#run")
            page.wait_for_function(
                "document.getElementById('status').textContent === 'done'", timeout=30000
            )
            unsteered = page.inner_text("#unsteered")
            first = page.inner_text("#steered")
            assert unsteered and first
            # move the slider: set its value and fire the input event a person's drag fires
            page.eval_on_selector(
                "#multiplier", "el => { el.value = '-12'; el.dispatchEvent(new Event('input')); }"
            )
            page.wait_for_function(
                "document.getElementById('multiplier-value').textContent === '-12'"
            )
            page.wait_for_function(
                "document.getElementById('status').textContent === 'done' && "
                "document.getElementById('steered-title').textContent.includes('x-12')",
                timeout=30000,
            )
            second = page.inner_text("#steered")
            assert second and second != first
            assert page.inner_text("#unsteered") == unsteered
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000

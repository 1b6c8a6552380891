"""End-to-end: the playground and the inspect page in headless Chromium (Debian's package),
driven by Playwright. Screenshots go to test-artifacts/; with STEERLAB_SCREENSHOTS=docs the
default-model ones also replace README's images in docs/ (``make screenshots``)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import tiny
from helpers import random_vector, start_server
from test_compare import write_sweep

from steerlab.evaluation import pages
from steerlab.evaluation.sweep_summary import read_sweep
from steerlab.formats import load_vector, save_vector
from steerlab.hf import projection
from steerlab.serving.app import Limits, create_app, load_vectors

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    lm = tiny.model("llama")
    vdir = tmp_path_factory.mktemp("vectors")
    save_vector(random_vector(lm, [1, 2], seed=4, scale=2.0), vdir / "joy.safetensors")
    vectors = load_vectors(vdir, lm)
    sweep = read_sweep(write_sweep(tmp_path_factory.mktemp("sweep"), lm))
    vectors["sweep"] = load_vector(sweep.vector)
    app = create_app(lm, vectors, Limits(max_tokens=64), sweep=sweep, sweep_vector="sweep")
    base, stop = start_server(app)
    yield base + "/"
    stop()


def open_page(browser, url, width=1280, height=800):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    return page


def wait_done(page, timeout=60000):
    page.wait_for_function(
        "['done', 'error'].includes(document.getElementById('status').textContent)",
        timeout=timeout,
    )
    assert page.inner_text("#status") == "done", page.inner_text("#error")


def panes(page):
    """Each pane's multiplier, token count, coloured token count and text."""
    return page.eval_on_selector_all(
        "#rows .pane",
        """els => els.map(p => ({
            multiplier: parseFloat(p.dataset.multiplier),
            title: p.querySelector('.title').textContent,
            tokens: p.querySelectorAll('.tok').length,
            coloured: p.querySelectorAll('.tok.coloured').length,
            text: p.querySelector('.out').textContent,
        }))""",
    )


def coloured_count(page) -> int:
    return int(re.search(r"(\d+) tokens coloured", page.inner_text("#kl-count")).group(1))


def test_the_multiplier_row_streams_together_and_colours_tokens_by_kl(browser, url):
    page = open_page(browser, url)
    try:
        page.fill("#max-tokens", "12")
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")  # the keyboard runs it
        wait_done(page)
        rows = panes(page)
        assert [r["multiplier"] for r in rows] == [-8, -4, 0, 4, 8]
        assert rows[2]["title"] == "×0 (unsteered)" and rows[4]["title"] == "×8"
        assert all(r["tokens"] >= 1 for r in rows)
        assert rows[2]["coloured"] == 0  # the unsteered row has KL 0 everywhere
        total = sum(r["coloured"] for r in rows)
        assert total > 0 and total == coloured_count(page)
        assert len({r["text"] for r in rows}) > 1
        # hovering a coloured token shows its KL and the tokens that changed most
        page.hover("#row-4 .tok.coloured")
        tip = page.inner_text("#tip")
        assert "KL" in tip and "most changed" in tip and page.is_visible("#tip")
        # the keyboard steps through a pane's tokens too
        page.focus("#row-0")
        page.keyboard.press("ArrowRight")
        assert page.inner_text("#tip").startswith("token 1:")
        page.keyboard.press("ArrowRight")
        assert page.inner_text("#tip").startswith("token 2:")
        page.keyboard.press("Escape")
        assert not page.is_visible("#tip")
        page.hover("#row-4 .tok.coloured")
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        # moving the slider reruns the row at the new multiplier
        page.eval_on_selector(
            "#multiplier", "el => { el.value = '-6'; el.dispatchEvent(new Event('input')); }"
        )
        page.wait_for_function(
            "document.querySelector('#row-0') && document.querySelector('#row-0').dataset.multiplier === '12'"
        )
        wait_done(page)
        assert [r["multiplier"] for r in panes(page)] == [12, 6, 0, -6, -12]
        assert page.inner_text("#multiplier-value") == "-6"
    finally:
        page.close()
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


def test_errors_show_in_the_page(browser, url):
    page = open_page(browser, url)
    try:
        page.fill("#factors", "one two")
        page.click("#run")
        assert "the row needs numbers" in page.inner_text("#error")
        page.fill("#factors", "-1 0 1")
        page.fill("#max-tokens", "100000")
        page.click("#run")
        page.wait_for_function("document.getElementById('status').textContent === 'error'")
        assert "above this server's limit of 64" in page.inner_text("#error")
        assert page.is_visible("#error")
        page.fill("#factors", "1 2 3 4 5 6 7 8 9")  # more rows than a batch holds
        page.fill("#max-tokens", "4")
        page.click("#run")
        page.wait_for_function(
            "document.getElementById('error').textContent.includes('multipliers')"
        )
        # a good request afterwards clears the error
        page.fill("#factors", "0 1")
        page.click("#run")
        wait_done(page)
        assert not page.is_visible("#error") and len(panes(page)) == 2
    finally:
        page.close()


def test_a_narrow_window_stacks_the_row_without_scrolling_sideways(browser, url):
    page = open_page(browser, url, width=380, height=900)
    try:
        page.fill("#max-tokens", "6")
        page.click("#run")
        wait_done(page)
        lefts = page.eval_on_selector_all("#rows .pane", "els => els.map(p => p.offsetLeft)")
        assert len(lefts) == 5 and len(set(lefts)) == 1
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(ARTIFACTS / "playground-narrow.png"), full_page=True)
    finally:
        page.close()


def test_the_sweep_panel_shows_plots_and_uses_the_recommendation(browser, url):
    page = open_page(browser, url)
    try:
        assert page.is_visible("#sweep")
        assert "Recommended: layer 2, multiplier 4" in page.inner_text("#recommendation")
        page.wait_for_function(
            "[...document.querySelectorAll('#plots img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        assert page.eval_on_selector_all("#plots img", "els => els.length") == 3
        page.fill("#max-tokens", "6")
        page.click("#use-recommendation")
        wait_done(page)
        assert page.input_value("#vector") == "sweep" and page.input_value("#layer") == "2"
        assert [r["multiplier"] for r in panes(page)] == [-8, -4, 0, 4, 8]
        page.screenshot(path=str(ARTIFACTS / "playground-sweep.png"), full_page=True)
    finally:
        page.close()


def test_the_inspect_page_renders_every_token_coloured(browser, tmp_path):
    lm = tiny.model("llama")
    vec = random_vector(lm, [1, 2], seed=3)
    view = projection.token_projections(lm, "the sea was calm and bright today", vec, 1)
    path = tmp_path / "page.html"
    path.write_text(pages.html_page(view))
    page = browser.new_page(viewport={"width": 900, "height": 500})
    try:
        page.goto(path.as_uri())
        spans = page.eval_on_selector_all(
            "#tokens .tok", "els => els.map(e => [e.textContent, e.dataset.value])"
        )
        assert [s[0] for s in spans] == list(view.pieces)
        assert [float(s[1]) for s in spans] == pytest.approx(view.values, rel=1e-5)
        assert page.is_visible("#scale")
        page.screenshot(path=str(ARTIFACTS / "inspect-tiny.png"), full_page=True)
    finally:
        page.close()


@pytest.mark.slow
def test_real_model_readme_screenshots(browser, tmp_path):
    """README's two images: the default model with the shipped sentiment vector."""
    from steerlab import load_model
    from steerlab.core.dataset import load_dataset
    from steerlab.core.files import sentiment_dataset_path
    from steerlab.evaluation.plots import contrast_histogram
    from steerlab.hf.extraction import extract

    lm = load_model()
    data = load_dataset(sentiment_dataset_path())
    held_out = data.subset(list(range(60)))  # the contrast scores pairs the vector never saw
    vector = extract(lm, data.subset(list(range(60, len(data)))), [9])
    # the inspect page, as `steerlab inspect ... --contrast FILE -o page.html` makes it
    text = "The food was awful and cold, but the staff were kind and I left happy."
    view = projection.token_projections(lm, text, vector, 9, name="sentiment")
    result = projection.contrast(lm, held_out, vector, 9)
    page_path = tmp_path / "inspect.html"
    histogram = contrast_histogram(
        result.positive, result.negative, "sentiment, layer 9: 60 held-out pairs"
    )
    page_path.write_text(pages.html_page(view, result, histogram))
    shots = {}
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    try:
        page.goto(page_path.as_uri())
        assert page.eval_on_selector_all("#tokens .tok", "els => els.length") == len(view.values)
        # the page's AUC is the Mann-Whitney statistic of the two score lists, by hand
        pos, neg = result.positive, result.negative
        auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert f"AUC {auc:.3f} at layer 9" in page.inner_text("#contrast")
        assert len(pos) == len(neg) == 60 and page.is_visible("#histogram")
        shots["inspect.png"] = ARTIFACTS / "inspect.png"
        page.screenshot(path=str(shots["inspect.png"]), full_page=True)
    finally:
        page.close()
    # the playground: the multiplier row at layer 9, coloured by KL
    vdir = tmp_path / "vectors"
    vdir.mkdir()
    save_vector(vector, vdir / "sentiment.safetensors")
    app = create_app(lm, load_vectors(vdir, lm), Limits(max_tokens=64))
    base, stop = start_server(app)
    page = open_page(browser, base + "/", width=1400, height=560)
    try:
        page.fill("#max-tokens", "24")
        page.click("#run")
        wait_done(page, timeout=240000)
        rows = panes(page)
        assert [r["multiplier"] for r in rows] == [-8, -4, 0, 4, 8]
        assert rows[2]["coloured"] == 0 and coloured_count(page) > 0
        assert all(r["tokens"] > 0 for r in rows)
        page.hover("#row-4 .tok.coloured")
        shots["playground.png"] = ARTIFACTS / "playground-default-model.png"
        page.screenshot(path=str(shots["playground.png"]), full_page=True)
    finally:
        page.close()
        stop()
    if os.environ.get("STEERLAB_SCREENSHOTS") == "docs":
        for name, shot in shots.items():
            shutil.copyfile(shot, ROOT / "docs" / name)

"""The playground in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): type a
prompt, watch the canvas fill in, check the final text and the stats, take a screenshot.

UNMASK_PLAYGROUND_MODEL=DIR serves that model instead of the tiny one, and
UNMASK_PLAYGROUND_SCREENSHOT=FILE also writes the screenshot there (how docs/playground.png is made).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import unmask
from test_server_support import live, tiny, tiny_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def ensure_chromium() -> None:
    """Install Debian's chromium if it is missing (as root, non-interactively); skip only if that fails."""
    if CHROMIUM.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs /usr/bin/chromium: run `apt-get install -y chromium` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode == 0 and CHROMIUM.exists():
            return
    if not CHROMIUM.exists():
        pytest.skip(f"chromium could not be installed: {r.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def browser():
    ensure_chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield b
        b.close()


def test_playground_generates_and_shows_the_canvas(browser, tiny, tmp_path):  # noqa: F811
    path = os.environ.get("UNMASK_PLAYGROUND_MODEL")
    model = unmask.load(path) if path else tiny
    prompt = os.environ.get("UNMASK_PLAYGROUND_PROMPT", "def fibonacci(n):\n    ")
    max_tokens = 48 if path else 24
    with live(model) as s:
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(s.url + "/")
        page.wait_for_function("document.querySelector('#model').textContent.includes('ctx')")
        page.fill("#prompt", prompt)
        page.select_option("#policy", "threshold")
        page.fill("#threshold", "0.7")
        page.select_option("#fallback", "leftmost")
        page.fill("#max-tokens", str(max_tokens))
        if not path:
            page.fill("#block-size", "4")
        # record every canvas the page draws, to check masks give way to committed tokens step by step
        page.evaluate("""() => { window.frames_ = [];
            new MutationObserver((records) => { for (const r of records) {
                const spans = [...r.addedNodes];
                if (spans.length) window.frames_.push({
                  masked: spans.filter((n) => n.classList.contains('masked')).length,
                  fresh: spans.filter((n) => n.classList.contains('new')).length});
            } }).observe(document.querySelector('#canvas'), {childList: true}); }""")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=120_000)
        frames = page.evaluate("window.frames_")
        text = page.inner_text("#output")
        stats = {k: page.inner_text(f"#stat-{k}") for k in ("tps", "nfe", "tpf", "tokens")}
        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("UNMASK_PLAYGROUND_SCREENSHOT"):
            shutil.copy(shot, os.environ["UNMASK_PLAYGROUND_SCREENSHOT"])
        page.close()

    # the same request through the API gives the text the page shows
    import httpx
    with live(model) as s:
        body = {"prompt": prompt, "max_tokens": max_tokens, "policy": "threshold", "threshold": 0.7, "temperature": 0,
                "fallback": "leftmost"}
        if not path:
            body["block_size"] = 4
        api = httpx.post(s.url + "/v1/completions", json=body, timeout=120).json()
    assert text == api["choices"][0]["text"]
    assert int(stats["nfe"]) == api["stats"]["nfe"] == len(frames)
    assert float(stats["tpf"]) == pytest.approx(api["stats"]["tokens_per_forward"], abs=0.01)
    assert int(stats["tokens"]) == api["usage"]["completion_tokens"] and float(stats["tps"]) > 0
    assert frames[0]["masked"] > 0 and frames[-1]["masked"] == 0
    assert all(f["fresh"] >= 1 for f in frames)  # every step highlights what it committed
    assert [f["masked"] for f in frames] == sorted((f["masked"] for f in frames), reverse=True)
    assert shot.stat().st_size > 10_000


def test_playground_fills_a_template(browser, tmp_path):
    """The template box: fixed spans drawn as template text from the first step, the holes filling,
    the final text and the holes equal to the API's."""
    import httpx

    model = unmask.load(Path(__file__).resolve().parents[1] / "models" / "unmask-coder")
    template = 'def area(r):\n    {{hole:12}}\n\ndef sub(a, b):\n    return {{hole:6}}\n'
    with live(model) as s:
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(s.url + "/")
        page.wait_for_function("document.querySelector('#model').textContent.includes('ctx')")
        page.fill("#prompt", "import math\n\n")
        page.fill("#template", template)
        page.evaluate("""() => { window.frames_ = [];
            new MutationObserver((records) => { for (const r of records) {
                const spans = [...r.addedNodes];
                if (spans.length) window.frames_.push({
                  masked: spans.filter((n) => n.classList.contains('masked')).length,
                  fixed: spans.filter((n) => n.classList.contains('fixed')).map((n) => n.textContent).join('')});
            } }).observe(document.querySelector('#canvas'), {childList: true}); }""")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=120_000)
        frames = page.evaluate("window.frames_")
        text = page.inner_text("#output")
        holes = page.inner_text("#holes")
        page.screenshot(path=str(tmp_path / "template.png"), full_page=True)
        page.close()
        body = {"prompt": "import math\n\n", "template": ["def area(r):\n    ", {"hole": 12},
                "\n\ndef sub(a, b):\n    return ", {"hole": 6}, "\n"]}
        api = httpx.post(s.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    assert text == api["text"]
    assert len(holes.splitlines()) == 2 and str(api["holes"][0]["tokens"]) in holes
    assert frames[0]["masked"] > 0 and frames[-1]["masked"] == 0
    # the template's text is on the canvas from the first step, marked as such (whitespace shown)
    for f in frames:
        assert f["fixed"].startswith("def area(r):") and "def sub(a, b):" in f["fixed"]


def test_playground_shows_revised_positions(browser, tiny):  # noqa: F811
    """With remask, a step that sends tokens back to mask draws them as retracted."""
    with live(tiny) as s:
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(s.url + "/")
        page.wait_for_function("document.querySelector('#model').textContent.includes('ctx')")
        page.fill("#prompt", "def fibonacci(n):\n    ")
        page.fill("#max-tokens", "24")
        page.fill("#remask", "0.9")
        page.evaluate("""() => { window.revised_ = 0;
            new MutationObserver((records) => { for (const r of records)
                window.revised_ += [...r.addedNodes].filter((n) => n.classList.contains('revised')).length;
            }).observe(document.querySelector('#canvas'), {childList: true}); }""")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=120_000)
        assert page.evaluate("window.revised_") > 0
        page.close()

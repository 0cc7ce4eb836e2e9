"""The live denoising view in a real headless Chromium (Debian's `chromium` package, driven over the DevTools pipe
by tests/cdp.py): the page served by `blockdiff serve` decodes a typed prompt, draws the steps, shows the same final
text as the API, produces no console error, and replays a `blockdiff generate --trace` file. Skipped, saying why,
where Chromium is not installed."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve tests need the serve extra (pip install -e '.[test]')")

from cdp import Browser, find_chromium  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from serve_helpers import running_server  # noqa: E402

CHROMIUM = find_chromium()
DRAWN_SLOTS = """(() => {
  const slots = [...document.querySelectorAll('#canvas .slot')];
  const end = slots.findIndex((s) => s.classList.contains('eos'));
  return slots.slice(0, end < 0 ? slots.length : end).map((s) => s.textContent).join('');
})()"""
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                                                         "the live-view browser test needs a headless browser")


BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "tiny-bd"  # trained: its tokens are whole characters


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(BUNDLED, log=tmp_path_factory.mktemp("serve") / "server.log") as url:
        yield url


@pytest.fixture
def browser():
    b = Browser(CHROMIUM)
    yield b
    b.close()


@pytest.mark.parametrize("mode", ["S", "threshold"])
def test_page_decodes_a_prompt_like_the_api(server, browser, tmp_path, mode):
    prompt, n = "def add(a, b):", 24
    browser.navigate(server + "/?" + urlencode({"prompt": prompt, "mode": mode, "max_tokens": n, "autorun": 1}))
    browser.wait("document.getElementById('status').textContent.startsWith('done')", 60)
    shown = browser.evaluate("document.getElementById('final').textContent")
    api = httpx.post(server + "/v1/completions", json={"prompt": prompt, "mode": mode, "max_tokens": n}, timeout=30)
    text = api.json()["choices"][0]["text"]
    assert shown == text and text.strip()
    steps = int(browser.evaluate("document.getElementById('step').textContent"))
    assert steps == api.json()["blockdiff"]["forwards"] and steps > 0
    # the canvas as drawn: its slots up to the first EOS spell the API's text (newlines drawn as a return arrow),
    # none of them still masked
    drawn = browser.evaluate(DRAWN_SLOTS)
    assert "\u2592" not in drawn and drawn.replace("\u21b5", "\n") == text, (drawn, text)
    shot = tmp_path / f"viz-{mode}.png"
    browser.screenshot(shot)
    box = browser.evaluate("(() => { const r = document.getElementById('canvas').getBoundingClientRect(); "
                           "return [r.left, r.top, r.right, r.bottom].map(Math.round); })()")
    with Image.open(shot) as img:  # the slots are painted: many colours (glyphs, confidence shades), not a blank box
        colours = img.convert("RGB").crop(tuple(box)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, colours
    assert browser.evaluate("document.getElementById('errors').textContent") == "0"
    assert browser.errors() == []


def test_page_replays_a_trace(server, browser, tmp_path):
    trace = tmp_path / "trace.jsonl"
    code, _, err = run_cli(["generate", "--model", BUNDLED, "--prompt", "add 1+2=", "--mode", "S",
                            "--max-new-tokens", 12, "--trace", trace])
    assert code == 0, err
    done = [json.loads(x) for x in trace.read_text().splitlines() if '"done"' in x][0]
    browser.navigate(server + "/")
    browser.evaluate("document.getElementById('delay').value = '1'")
    browser.set_file("#trace", trace)
    browser.wait("!document.getElementById('replay').disabled", 10)
    browser.evaluate("document.getElementById('replay').click()")
    browser.wait("document.getElementById('status').textContent.startsWith('replayed')", 30)
    assert f"{done['forwards']} forwards" in browser.evaluate("document.getElementById('status').textContent")
    assert browser.evaluate("document.querySelectorAll('#canvas .slot:not(.mask)').length") >= len(done["tokens"])
    assert browser.errors() == []

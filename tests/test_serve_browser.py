"""The live denoising view in a real headless Chromium (Debian's `chromium` package, driven over the DevTools pipe
by tests/cdp.py): the page served by `blockdiff serve` decodes a typed prompt, draws the steps, shows the same final
text as the API, produces no console error, and replays a `blockdiff generate --trace` file. Skipped, saying why,
where Chromium is not installed."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve tests need the serve extra (pip install -e '.[test]')")

from cdp import Browser, find_chromium  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from serve_helpers import running_server  # noqa: E402

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                                                         "the live-view browser test needs a headless browser")


@pytest.fixture(scope="module")
def server(tiny_bd_dir, tmp_path_factory):
    with running_server(tiny_bd_dir, log=tmp_path_factory.mktemp("serve") / "server.log") as url:
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
    assert shown == api.json()["choices"][0]["text"]
    steps = int(browser.evaluate("document.getElementById('step').textContent"))
    assert steps == api.json()["blockdiff"]["forwards"] and steps > 0
    assert browser.evaluate("document.querySelectorAll('#canvas .slot').length") > 0
    shot = tmp_path / f"viz-{mode}.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    assert browser.evaluate("document.getElementById('errors').textContent") == "0"
    assert browser.errors() == []


def test_page_replays_a_trace(server, browser, tiny_bd_dir, tmp_path):
    trace = tmp_path / "trace.jsonl"
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "add 1+2=", "--mode", "S",
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

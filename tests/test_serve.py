"""`blockdiff serve` end to end: a real server process on 127.0.0.1 (the tiny random diffusion model of conftest,
B = 8, context 512), the real `openai` client and raw HTTP. Completions and chat, streamed and not; streamed
deltas join to the non-streamed text; 64 concurrent streams at temperature 0 give the texts of the same requests
sent one by one; 1,000 malformed or hostile requests all get a 4xx in the OpenAI error shape and the server still
answers; a client that disconnects mid-stream frees its row (seen in /metrics); a full queue answers 503 with
Retry-After; a request past --request-timeout gets 504. Loops are bounded in count and time."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the serve tests need the serve extra (pip install -e '.[test]')")

from serve_helpers import metric, running_server, start_server, stop_server, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SLOW = {"mode": "threshold", "threshold": 1.0, "ignore_eos": True}  # one token per step: a long-running row


@pytest.fixture(scope="module")
def server(tiny_bd_dir, tmp_path_factory):
    with running_server(tiny_bd_dir, "--max-running", 16, "--max-queue", 128,
                        log=tmp_path_factory.mktemp("serve") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """(Loaded, base URL): the bundled converted checkpoint (trained: confidences spread, so thresholds matter;
    labels shift + causal clean stream, so spec and windows run), loaded here and served by a real process."""
    from blockdiff.load import load_checkpoint

    folder = REPO / "assets" / "tiny-bd"
    with running_server(folder, log=tmp_path_factory.mktemp("serve-bundled") / "server.log") as url:
        yield load_checkpoint(folder), url


def streamed(client, **kw) -> tuple[str, str, list]:
    """(joined text deltas, finish reason, chunks) of a streamed completion or chat completion."""
    chat = "messages" in kw
    api = client.chat.completions if chat else client.completions
    text, reason, chunks = "", None, []
    for ch in api.create(stream=True, **kw):
        chunks.append(ch)
        for c in ch.choices:
            text += (c.delta.content or "") if chat else c.text
            reason = c.finish_reason or reason
    return text, reason, chunks


def test_models_health_and_completions(server, client):
    [m] = client.models.list().data
    assert m.id == "model" and httpx.get(server + "/health").json() == {"status": "ok"}
    for extra in ({"mode": "S"}, {"mode": "Q"}, {"mode": "threshold", "eos_fill": True}, {"mode": "credit"}):
        body = {**extra, "ignore_eos": True}
        r = client.completions.create(model="model", prompt="add 12+34=", max_tokens=13, extra_body=body)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 13
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 13
        text, reason, chunks = streamed(client, model="model", prompt="add 12+34=", max_tokens=13, extra_body=body,
                                        stream_options={"include_usage": True})
        assert text == r.choices[0].text and reason == "length", extra
        assert chunks[-1].usage.completion_tokens == 13  # include_usage: the last chunk counts
    n2 = client.completions.create(model="model", prompt=["a", "bb"], max_tokens=5, n=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in n2.choices) == [0, 1, 2, 3] and n2.usage.completion_tokens == 20
    assert n2.choices[0].text == n2.choices[1].text  # temperature 0: the n choices agree


def test_chat_and_stop(server, client):
    msgs = [{"role": "system", "content": "be short"}, {"role": "user", "content": "sort 3 1 2"}]
    r = client.chat.completions.create(model="model", messages=msgs, max_tokens=16, extra_body={"mode": "S"})
    text, reason, chunks = streamed(client, model="model", messages=msgs, max_tokens=16, extra_body={"mode": "S"})
    assert text == r.choices[0].message.content and reason == r.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"


def test_stop_strings_cut_the_text(bundled):
    """The bundled checkpoint continues "def f(x):" with a fixed greedy text (S mode) that holds " and" twice and
    "return" once: a stop string cuts before its first occurrence, streamed or not; of two stop strings the earlier
    occurrence wins; a stop string that never occurs changes nothing. Unconditional: the text is checked first."""
    loaded, url = bundled
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    kw = dict(model="tiny-bd", prompt="def f(x):", max_tokens=24, extra_body={"mode": "S"})
    full = client.completions.create(**kw).choices[0].text
    g, _ = engine(loaded, "def f(x):", {"mode": "S"})
    assert full == loaded.tokenizer.decode(g.tokens)
    assert full.count(" and") == 2 and full.index("return") < full.index(" and"), full
    for stop, cut_at in (([" and"], full.index(" and")), ([" and", "return"], full.index("return")),
                         (["return", " and"], full.index("return"))):
        r = client.completions.create(stop=stop, **kw).choices[0]
        assert (r.text, r.finish_reason) == (full[:cut_at], "stop"), stop
        assert streamed(client, stop=stop, **kw)[:2] == (full[:cut_at], "stop"), stop
    r = client.completions.create(stop=["never occurs"], **kw).choices[0]
    assert r.text == full


def test_sampling_with_seed_is_reproducible(client):
    """The same seed gives the same sample; another seed, no seed, or temperature 0 give another text (the random
    model's distribution is nearly flat over 12 tokens, so equal texts would mean the field was ignored)."""
    kw = dict(model="model", prompt="hello", max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"ignore_eos": True, "mode": "S"})
    text = lambda **over: client.completions.create(**{**kw, **over}).choices[0].text  # noqa: E731
    a, b = text(), text()
    assert a == b
    assert text(seed=8) != a and text(seed=None) != a
    greedy = text(temperature=0.0)
    assert greedy != a and greedy == text(temperature=0.0, seed=8)  # temperature 0: the seed does not matter


def test_64_concurrent_streams_equal_requests_one_by_one(server, client):
    rng = random.Random(0)
    words = ["add", "sort", "x", "def", "return", "12", "+", "=", "lookup", "of", "(", ")"]
    reqs = [dict(model="model", prompt=" ".join(rng.choice(words) for _ in range(1 + k % 9)), max_tokens=6 + k % 11,
                 extra_body={"mode": ["S", "Q", "threshold", "dinfer"][k % 4]}) for k in range(64)]
    t0 = time.monotonic()
    alone = [client.completions.create(**r).choices[0].text for r in reqs]
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(lambda r: streamed(client, **r)[0], reqs))
    assert together == alone
    assert time.monotonic() - t0 < 120
    assert metric(server, "blockdiff_running_rows") == 0 and metric(server, "blockdiff_queue_requests") == 0


def hostile_bodies(rng: random.Random, n: int) -> list[tuple[str, str, bytes, dict]]:
    """n (method, path, body, headers) that must each get a 4xx."""
    good = {"model": "model", "prompt": "hi", "max_tokens": 4}
    bad_fields = [("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 10 ** 12), ("max_tokens", "8"),
                  ("max_tokens", 2.5), ("max_tokens", True), ("temperature", -0.1), ("temperature", "hot"),
                  ("temperature", 9), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 10 ** 6), ("n", "2"),
                  ("seed", "s"), ("seed", 1.5), ("stop", 3), ("stop", [1, 2]), ("stop", [""]), ("stop", ["a"] * 99),
                  ("stream", "yes"), ("mode", "turbo"), ("mode", 3), ("threshold", 1.5), ("threshold", -1),
                  ("edit_threshold", 7), ("block_size", 0), ("block_size", -8), ("block_size", 10 ** 9),
                  ("steps", 0), ("max_post_steps", -1), ("factor", 0), ("top_k", -1), ("prompt", ""),
                  ("prompt", []), ("prompt", [[]]), ("prompt", None), ("prompt", 5), ("prompt", {"a": 1}),
                  ("prompt", [-1, 2]), ("prompt", [10 ** 9]), ("prompt", [1, "a"]), ("prompt", "<|mask|>" * 3),
                  ("prompt", [320, 320]), ("model", "gpt-4"), ("model", 7), ("logprobs", 5), ("echo", True),
                  ("best_of", 3), ("presence_penalty", 1.0), ("stream_options", 3), ("stream_denoise", True),
                  ("prompt", [5] * 600), ("eos_fill", "no"), ("prompt", ["a"] * 65), ("prompt", ["a"] * 9),
                  ("draft_len", -1), ("draft_len", 33), ("draft_len", "2"), ("mode", "spec")]
    out = []
    for k in range(n):
        kind = k % 10
        if kind < 6:  # one bad field in an otherwise good completion
            f, v = bad_fields[rng.randrange(len(bad_fields))]
            body = {**good, f: v}
            if f == "prompt" and v == ["a"] * 9:  # 9 prompts x n 2 = 18 rows > --max-running 16
                body["n"] = 2
            if f == "prompt" and v is None:
                del body["prompt"]
            out.append(("POST", "/v1/completions", json.dumps(body).encode(), {}))
        elif kind == 6:  # not JSON / not an object / too deep
            junk = [b"{bad", b"", b"[1, 2]", b"null", b'"text"', b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000,
                    b'{"prompt": NaN-}', b'{"max_tokens": Infinity, "prompt": "a"}',
                    b'{"temperature": NaN, "prompt": "a"}']
            out.append(("POST", "/v1/completions", junk[rng.randrange(len(junk))], {}))
        elif kind == 7:  # chat messages
            bad_msgs = [[], "hi", [{"role": "robot", "content": "x"}], [{"role": "user"}], [{"content": "x"}],
                        [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}], [3]]
            body = {"model": "model", "messages": bad_msgs[rng.randrange(len(bad_msgs))], "max_tokens": 4}
            out.append(("POST", "/v1/chat/completions", json.dumps(body).encode(), {}))
        elif kind == 8:  # wrong method or path
            out.append(rng.choice([("GET", "/v1/completions", b"", {}), ("POST", "/v1/models", b"{}", {}),
                                   ("GET", "/v1/nothing", b"", {}), ("DELETE", "/health", b"", {})]))
        elif k % 100 == 9:  # a body over --max-body-bytes (1 MiB)
            out.append(("POST", "/v1/completions", b'{"prompt": "' + b"a" * (1 << 21) + b'"}', {}))
        else:  # a huge or hostile chat prompt
            body = {"model": "model", "messages": [{"role": "user", "content": "<|mask|>" * 700}], "max_tokens": 4}
            out.append(("POST", "/v1/chat/completions", json.dumps(body).encode(), {}))
    return out


def test_1000_hostile_requests_get_4xx_and_the_server_still_answers(server, client):
    t0 = time.monotonic()
    with httpx.Client(base_url=server, timeout=30) as http:
        for method, path, body, headers in hostile_bodies(random.Random(1), 1000):
            r = http.request(method, path, content=body, headers={"content-type": "application/json", **headers})
            assert 400 <= r.status_code < 500, (method, path, body[:200], r.status_code, r.text[:300])
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"] and "type" in err
            assert time.monotonic() - t0 < 120
    r = client.completions.create(model="model", prompt="add 1+2=", max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert metric(server, "blockdiff_running_rows") == 0


def test_disconnect_mid_stream_frees_the_row(server):
    cancelled = metric(server, "blockdiff_cancelled_total")
    body = {"model": "model", "prompt": "count", "max_tokens": 480, "stream": True, **SLOW}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            assert metric(server, "blockdiff_running_rows") == 1
        # leaving the block closes the connection mid-stream
    wait_for(lambda: metric(server, "blockdiff_running_rows") == 0, 10, "the row left after the disconnect")
    assert metric(server, "blockdiff_cancelled_total") == cancelled + 1


def test_full_queue_answers_503_and_timeout_504(tiny_bd_dir, tmp_path):
    with running_server(tiny_bd_dir, "--max-running", 1, "--max-queue", 1, log=tmp_path / "server.log") as url:
        slow = {"model": "model", "prompt": "count", "max_tokens": 480, "stream": True, **SLOW}
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=slow) as first:
            lines = first.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            queued = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", timeout=60,
                                                                json={"prompt": "a", "max_tokens": 4}))
            queued.start()
            wait_for(lambda: metric(url, "blockdiff_queue_requests") == 1, 10, "the second request waits")
            r = httpx.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 4}, timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        queued.join(timeout=30)
        assert not queued.is_alive()
    with running_server(tiny_bd_dir, "--request-timeout", 0.05, log=tmp_path / "server2.log") as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 480, **SLOW}, timeout=30)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        assert metric(url, "blockdiff_running_rows") == 0 and metric(url, "blockdiff_timeouts_total") == 1


def test_cli_refuses_bad_limits_and_oversize_decodes(tiny_bd_dir):
    """The serve flags are checked before loading (exit 2 naming the flag); the engine's one context check gives
    `generate` its exit 2 naming both numbers (the server's 400 above comes from the same check)."""
    from cli_helpers import assert_usage_error, run_cli

    for flag, value in (("--max-running", 0), ("--max-queue", 0), ("--request-timeout", 0), ("--port", 70000),
                        ("--shutdown-grace", -1)):
        code, _, err = run_cli(["serve", "--model", tiny_bd_dir, flag, value])
        assert_usage_error(code, err, "serve", flag)
    code, _, err = run_cli(["serve", "--model", tiny_bd_dir.parent / "missing"])
    assert code == 2 and "Traceback" not in err
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "add 1+2=", "--max-new-tokens", 600])
    assert_usage_error(code, err, "generate", "600", "needs 608 positions", "context of 512")


def test_ar_checkpoint_is_served_autoregressively(tiny_ar_dir, tmp_path):
    """A folder without a diffusion section is served through the AR scheduler: the texts of `Loaded.generate`."""
    from blockdiff.load import load_checkpoint

    loaded = load_checkpoint(tiny_ar_dir)
    tok = loaded.tokenizer
    prompts = ["def f(x):", "add 1+2=", "sort 3 1 2 ="]
    want = [tok.decode(loaded.generate([tok.encode(p)], ar=True, max_new_tokens=12)[0].tokens) for p in prompts]
    with running_server(tiny_ar_dir, log=tmp_path / "server.log") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        with ThreadPoolExecutor(3) as pool:  # concurrent rows share the AR batch
            got = list(pool.map(lambda p: streamed(client, model="model", prompt=p, max_tokens=12)[0], prompts))
        assert got == want
        r = client.completions.create(model="model", prompt=prompts[0], max_tokens=12)
        assert r.choices[0].text == want[0] and r.model_extra["blockdiff"]["mode"] == "ar"


def test_spec_mode_serves_the_text_of_loaded_generate(bundled):
    """`"mode": "spec"` on the bundled converted checkpoint (labels shift, causal clean stream): each request gets the
    text of `Loaded.generate` in spec mode for the same prompt -- which is the checkpoint's own greedy AR text
    (lossless) -- whatever its draft_len, streamed or not, alone or sharing the batch with block-mode rows. A
    draft_len out of range gets a 400 naming the field."""
    from blockdiff.decode.config import MAX_DRAFT_LEN

    loaded, url = bundled
    tok = loaded.tokenizer
    prompts = ["add 12+34=", "def f(x):", "sort 3 1 2 ="]
    text = lambda g: tok.decode(g.tokens)  # noqa: E731
    spec = [text(loaded.generate([tok.encode(p)], loaded.decode_config(mode="spec", max_new_tokens=24))[0])
            for p in prompts]
    ar = [text(loaded.generate([tok.encode(p)], ar=True, max_new_tokens=24)[0]) for p in prompts]
    assert spec == ar
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    reqs = [dict(model="tiny-bd", prompt=p, max_tokens=24, extra_body={"mode": "spec", **extra})
            for p in prompts for extra in ({}, {"draft_len": 1}, {"draft_len": 6})]
    reqs.append(dict(model="tiny-bd", prompt=prompts[0], max_tokens=24, extra_body={"mode": "S"}))
    with ThreadPoolExecutor(len(reqs)) as pool:  # spec rows and a block row share the forwards
        got = list(pool.map(lambda r: streamed(client, **r)[0], reqs))
    assert got[:-1] == [t for t in spec for _ in range(3)]
    r = client.completions.create(model="tiny-bd", prompt=prompts[1], max_tokens=24, extra_body={"mode": "spec"})
    assert r.choices[0].text == spec[1] and r.model_extra["blockdiff"]["mode"] == "spec"
    for bad_value in (-1, MAX_DRAFT_LEN + 1, 2.5, "3", True):
        resp = httpx.post(url + "/v1/completions", timeout=30,
                          json={"prompt": "a", "max_tokens": 4, "mode": "spec", "draft_len": bad_value})
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["param"] == "draft_len", (bad_value, resp.text)
        assert err["message"].startswith("draft_len: ")


# (prompt, request fields): each one's last field changes what the engine decodes for that prompt (tokens or
# forwards; checked below), so a server that ignored or mis-mapped that field would answer differently
ENGINE_CASES = [
    ("sort 3 1 2 =", {"threshold": 0.5}),
    ("sort 3 1 2 =", {"threshold": 1.0, "steps": 4}),
    ("sort 3 1 2 =", {"max_tokens": 7}),
    ("sort 3 1 2 =", {"ignore_eos": True}),
    ("sort 3 1 2 =", {"block_size": 4}),
    ("sort 3 1 2 =", {"mode": "S"}),
    ("sort 3 1 2 =", {"mode": "S", "max_post_steps": 0}),
    ("sort 3 1 2 =", {"mode": "S", "block_size": 8}),
    ("sort 3 1 2 =", {"mode": "Q"}),
    ("def f(x):", {"mode": "Q", "edit_threshold": 0.1}),
    ("def f(x):", {"mode": "Q", "threshold": 0.9}),
    ("sort 3 1 2 =", {"mode": "joint", "threshold": 0.3, "edit_threshold": 0.2}),
    ("def f(x):", {"mode": "S", "repeat_penalty": 5.0}),
    ("def f(x):", {"mode": "S", "eos_fill": True}),
    ("def f(x):", {"mode": "dinfer"}),
    ("def f(x):", {"mode": "credit"}),
    ("sort 3 1 2 =", {"mode": "factor"}),
    ("sort 3 1 2 =", {"mode": "factor", "factor": 2.0}),
    ("def f(x):", {"window": 4}),
    ("sort 3 1 2 =", {"mode": "spec"}),
    ("sort 3 1 2 =", {"mode": "spec", "draft_len": 0}),
    ("def f(x):", {"mode": "S", "temperature": 1.0, "seed": 3}),
    ("def f(x):", {"mode": "S", "temperature": 1.0, "seed": 3, "top_k": 3}),
    ("def f(x):", {"mode": "S", "temperature": 1.0, "seed": 3, "top_p": 0.5}),
]


def engine(loaded, prompt: str, fields: dict):
    """`Loaded.generate` for one prompt with the request's fields written as DecodeConfig fields by hand (not
    through protocol.parse_decoding, which is what is checked); max_tokens 24 unless set."""
    import torch

    fields = {"max_tokens": 24, **fields}
    seed = fields.pop("seed", None)
    cfg = loaded.decode_config(**{"max_new_tokens" if k == "max_tokens" else k: v for k, v in fields.items()})
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return loaded.generate([loaded.tokenizer.encode(prompt)], cfg, generator=gen)[0], cfg


@pytest.mark.parametrize("prompt,fields", ENGINE_CASES, ids=[json.dumps(f) for _, f in ENGINE_CASES])
def test_served_text_equals_loaded_generate(bundled, prompt, fields):
    """The server's answer (text, tokens, forwards, finish reason, mode, block size) is `Loaded.generate`'s under the
    same settings -- and differs from the answer without the case's last field, so the field was honoured."""
    loaded, url = bundled
    g, cfg = engine(loaded, prompt, fields)
    control = dict(list(fields.items())[:-1])
    g0, _ = engine(loaded, prompt, control)
    assert (g.tokens, g.forwards) != (g0.tokens, g0.forwards), f"{list(fields)[-1]} changes nothing here: pick another case"
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 24, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    [choice] = body["choices"]
    assert choice["text"] == loaded.tokenizer.decode(g.tokens)
    assert choice["finish_reason"] == ("length" if g.stop_reason == "length" else "stop")
    assert body["usage"]["completion_tokens"] == g.n_generated
    if fields.get("mode") != "spec" or fields.get("draft_len") == 0:
        # spec's drafting is decided per forward for the server's whole batch (spec.DraftPolicy, whose running
        # acceptance outlives a request), so only plain AR steps (draft_len 0) have the forwards of the row alone
        assert body["blockdiff"]["forwards"] == g.forwards
    assert (body["blockdiff"]["mode"], body["blockdiff"]["block_size"]) == (cfg.mode, cfg.block_size)


def test_spec_on_a_checkpoint_without_a_causal_stream_is_a_400(server):
    """The conftest model has LLaDA2's layout (labels same, block-causal clean stream): no AR stream to verify with."""
    r = httpx.post(server + "/v1/completions", json={"prompt": "a", "max_tokens": 4, "mode": "spec"}, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert 'mode "spec" needs a checkpoint with labels "shift"' in r.json()["error"]["message"]
    assert metric(server, "blockdiff_running_rows") == 0


def test_spec_on_a_checkpoint_without_a_causal_stream_is_refused_before_streaming(server):
    for stream in (False, True):
        r = httpx.post(server + "/v1/completions", timeout=30,
                       json={"prompt": "a", "max_tokens": 4, "mode": "spec", "stream": stream})
        assert r.status_code == 400, (stream, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "mode", err


def test_a_busy_port_is_one_line_before_the_model_loads(tiny_bd_dir, tmp_path):
    """A second `serve` on a port that is taken: exit 2 and one line naming host:port, before loading (no banner;
    a missing model folder is not even looked at)."""
    from cli_helpers import assert_usage_error, run_cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "blockdiff.cli", "serve", "--model", str(tiny_bd_dir),
                            "--port", str(port), "--threads", "1"], capture_output=True, text=True, timeout=120)
        assert_usage_error(p.returncode, p.stderr, "serve", f"127.0.0.1:{port}", "in use")
        assert p.stdout == ""
        code, _, err = run_cli(["serve", "--model", tmp_path / "missing", "--port", port])
        assert_usage_error(code, err, "serve", f"127.0.0.1:{port}")


def test_ctrl_c_ends_every_request_and_exits_130(tiny_bd_dir, tmp_path):
    """Ctrl-C with one stream decoding and two requests waiting (--max-running 1): the requests get the grace
    period, then are cut -- each stream ends with an error chunk and [DONE], the waiting JSON request gets a 503 --
    and the process prints one line and exits 130, with no traceback. The three requests need ~5 s of decoding;
    the grace period is 0.5 s, so at least the last one is cut."""
    log = tmp_path / "server.log"
    proc, url = start_server(tiny_bd_dir, "--max-running", 1, "--shutdown-grace", 0.5, log=log)
    slow = {"prompt": "count", "max_tokens": 480, **SLOW}
    got: dict = {}

    def stream(name):
        with httpx.stream("POST", url + "/v1/completions", json={**slow, "stream": True}, timeout=60) as r:
            got[name] = [line for line in r.iter_lines() if line]

    def plain():
        r = httpx.post(url + "/v1/completions", json=slow, timeout=60)
        got["plain"] = (r.status_code, r.json())

    try:
        first = threading.Thread(target=stream, args=("first",))
        first.start()
        wait_for(lambda: metric(url, "blockdiff_running_rows") == 1, 20, "the first stream decodes")
        waiting = [threading.Thread(target=stream, args=("second",)), threading.Thread(target=plain)]
        for t in waiting:
            t.start()
        wait_for(lambda: metric(url, "blockdiff_queue_requests") == 2, 20, "two requests wait")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        for t in [first, *waiting]:
            t.join(timeout=30)
    finally:
        stop_server(proc)
    text = log.read_text()
    assert code == 130, text
    assert "Traceback" not in text and "CancelledError" not in text, text
    assert text.strip().splitlines()[-1] == "blockdiff serve: interrupted", text
    assert time.monotonic() - t0 < 10
    for name in ("first", "second"):
        assert got[name][-1] == "data: [DONE]", (name, got[name][-3:])
    assert "shutting down" in got["second"][-2], got["second"][-3:]
    status, body = got["plain"]
    assert status == 503 and "shutting down" in body["error"]["message"], body


# request field -> (value, the DecodeConfig fields it sets)
DECODING_FIELDS = {
    "max_tokens": (7, {"max_new_tokens": 7}),
    "max_completion_tokens": (9, {"max_new_tokens": 9}),
    "mode": ("Q", {"mode": "Q"}),
    "temperature": (0.7, {"temperature": 0.7}),
    "top_p": (0.5, {"top_p": 0.5}),
    "top_k": (5, {"top_k": 5}),
    "threshold": (0.4, {"threshold": 0.4}),
    "edit_threshold": (0.3, {"edit_threshold": 0.3}),
    "steps": (5, {"steps": 5}),
    "max_post_steps": (2, {"max_post_steps": 2}),
    "factor": (2.5, {"factor": 2.5}),
    "draft_len": (5, {"draft_len": 5}),
    "window": (4, {"window": 4}),
    "repeat_penalty": (1.5, {"repeat_penalty": 1.5}),
    "block_size": (16, {"block_size": 16}),
    "eos_fill": (True, {"eos_fill": True}),
    "ignore_eos": (True, {"ignore_eos": True}),
}
SERVER_SIDE = {"window_ar", "draft_cost", "spec_tokens"}  # DecodeConfig fields a request cannot set


def test_parse_decoding_maps_each_field_to_its_decode_config_field():
    """protocol.parse_decoding: each request field sets its DecodeConfig field and nothing else; absent fields
    keep the server's base; every DecodeConfig field is reachable from a request or listed as server-side."""
    import dataclasses

    from blockdiff.decode.config import DecodeConfig
    from blockdiff.serve.protocol import parse_decoding

    base = DecodeConfig(block_size=32, max_new_tokens=64)
    assert parse_decoding({}, base, max_tokens_limit=512) == (base, {})
    assert parse_decoding({"seed": 3, "n": 2, "stream": True, "stop": "x"}, base, max_tokens_limit=512)[0] == base
    for name, (value, want) in DECODING_FIELDS.items():
        cfg, fields = parse_decoding({name: value}, base, max_tokens_limit=512)
        assert fields == want and cfg == dataclasses.replace(base, **want), name
    cfg, _ = parse_decoding({"max_tokens": 7, "max_completion_tokens": 9}, base, max_tokens_limit=512)
    assert cfg.max_new_tokens == 7  # max_tokens wins, as OpenAI's legacy field
    every = {k: v for k, (v, _) in DECODING_FIELDS.items() if k != "max_completion_tokens"}
    cfg, fields = parse_decoding(every, base, max_tokens_limit=512)
    assert cfg == dataclasses.replace(base, **fields) and len(fields) == len(every)
    reachable = {f for _, want in DECODING_FIELDS.values() for f in want}
    assert reachable | SERVER_SIDE == {f.name for f in dataclasses.fields(DecodeConfig)}


@pytest.mark.parametrize("name,value", [
    ("max_tokens", 0), ("max_tokens", 513), ("max_completion_tokens", 0), ("mode", "turbo"), ("mode", 1),
    ("temperature", -0.5), ("temperature", 2.5), ("top_p", 0), ("top_p", 1.01), ("top_k", -1), ("threshold", 1.1),
    ("edit_threshold", -0.1), ("steps", 0), ("max_post_steps", -1), ("factor", 0), ("draft_len", 33),
    ("window", -1), ("repeat_penalty", -1), ("block_size", 0), ("eos_fill", 1), ("ignore_eos", "yes"),
    ("threshold", True), ("steps", 2.5), ("max_tokens", "8"),
])
def test_parse_decoding_refuses_a_bad_value_naming_the_field(name, value):
    from blockdiff.decode.config import DecodeConfig
    from blockdiff.serve.protocol import APIError, parse_decoding

    with pytest.raises(APIError) as e:
        parse_decoding({name: value}, DecodeConfig(block_size=32), max_tokens_limit=512)
    assert e.value.status == 400 and e.value.param == name and e.value.message.startswith(f"{name}: ")


def test_an_unknown_field_is_a_400_naming_it_and_the_openai_fields_are_accepted(server, client):
    """A misspelt field (`max_token`) is refused naming it, with the closest known field, as OpenAI answers; every
    field the openai client can send is either honoured, accepted as a no-op (user, metadata, ...) or refused only
    when it asks for something this server does not do."""
    for path, body, name in (("/v1/completions", {"prompt": "a", "max_token": 4}, "max_token"),
                             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                       "temprature": 0.5}, "temprature"),
                             ("/v1/completions", {"prompt": "a", "blocksize": 4}, "blocksize")):
        r = httpx.post(server + path, json=body, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == name and err["message"].startswith(f"{name}: unrecognized"), err
    assert "did you mean max_tokens" in httpx.post(server + "/v1/completions", json={"prompt": "a", "max_token": 4},
                                                   timeout=30).json()["error"]["message"]
    r = client.completions.create(model="model", prompt="add 1+2=", max_tokens=3, user="u", seed=1, n=1, best_of=1,
                                  echo=False, frequency_penalty=0, presence_penalty=0, logit_bias={}, temperature=0,
                                  top_p=1, stream_options=None, suffix=None)
    assert r.usage.completion_tokens <= 3
    msgs = [{"role": "user", "content": "add 1+2="}]
    r = client.chat.completions.create(model="model", messages=msgs, max_completion_tokens=3, user="u",
                                       metadata={"k": "v"}, store=False, service_tier="auto", n=1, seed=2,
                                       parallel_tool_calls=False, tool_choice="none", reasoning_effort="low",
                                       response_format={"type": "text"}, modalities=["text"], verbosity="low",
                                       safety_identifier="s", prompt_cache_key="k", top_logprobs=0, logprobs=False)
    assert r.choices[0].finish_reason in ("stop", "length")
    r = httpx.post(server + "/v1/chat/completions", timeout=30,
                   json={"messages": msgs, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"

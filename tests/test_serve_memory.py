"""`blockdiff serve` fits its KV cache to memory and never leaves a request hanging (issue 20 part 3).

The reported failure: on a model whose config says 131,072 positions (Llama 3.2), the server preallocated
--max-running 16 rows x the whole context at the first request, the decoding thread died allocating it, that
request hung and /health said 503 forever. Here: tiny random models whose config.json says 131,072 positions --
one with the conftest shape (256 B of K/V per position: the whole context fits) and one with Llama-3.2-1B's K/V
shape (16 layers x 8 KV heads x 64 dims, 64 KiB per position in fp32: the whole context would be 128 GiB) --
served by a real `blockdiff serve` process with default flags, queried with the real `openai` client and httpx.
The dead-loop tests run the app in process and inject one fault (the model's forward, or the allocation of a
cache, raising); everything else is real."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the serve tests need the serve extra (pip install -e '.[test]')")

from serve_helpers import metric, running_server, wait_for  # noqa: E402

GIB = 1 << 30
CONTEXT = 131_072  # Llama 3.2's max_position_embeddings
LLAMA_1B_KV = dict(num_layers=16, num_kv_heads=8, head_dim=64)  # 2 x 16 x 8 x 64 x 4 B = 64 KiB per position
START_LINE = re.compile(r"KV cache ([\d.]+) GiB = (\d+) rows x ([\d,]+) positions x ([\d,]+) B[^;]*; max model len "
                        r"([\d,]+).*; budget ([\d.]+) GiB")
SLOW = {"mode": "threshold", "threshold": 1.0, "ignore_eos": True}  # one token per step: a long-running row


def number(s: str) -> int:
    return int(s.replace(",", ""))


def start_line(log: Path) -> dict:
    """The numbers of the server's `KV cache ...` start line."""
    m = START_LINE.search(log.read_text())
    assert m, f"no KV cache line on stderr:\n{log.read_text()}"
    return dict(gib=float(m[1]), rows=int(m[2]), positions=number(m[3]), bpp=number(m[4]), max_model_len=number(m[5]),
                budget_gib=float(m[6]))


@pytest.fixture(scope="module")
def long_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"tiny": the conftest-shaped diffusion model, "wide": the same tokenizer with Llama-3.2-1B's K/V shape (and
    hidden size 32)}, both with max_position_embeddings 131,072 (RoPE has no table: any context is just a number)."""
    from conftest import make_tiny_model_dir

    from blockdiff.data.tokenizer import load_tokenizer
    from blockdiff.model.config import DiffusionInfo, ModelConfig
    from blockdiff.model.hf_io import save_pretrained
    from blockdiff.model.transformer import Transformer

    root = tmp_path_factory.mktemp("long")
    tiny = make_tiny_model_dir(root / "tiny", diffusion_block=8)
    cfg = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": CONTEXT}, indent=2))
    tok = load_tokenizer(tiny)
    wide_cfg = ModelConfig(family="llama", vocab_size=tok.mask_id + 1, hidden_size=32, intermediate_size=64,
                           num_heads=8, tie_word_embeddings=True, max_position_embeddings=CONTEXT, **LLAMA_1B_KV)
    torch.manual_seed(0)
    wide = Transformer(wide_cfg)
    wide.init_weights(seed=0)
    wide.cfg.diffusion = DiffusionInfo(mask_token_id=tok.mask_id, block_size=8)
    save_pretrained(wide, root / "wide", tokenizer=tok)
    return {"tiny": tiny, "wide": root / "wide"}


def client_of(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_default_flags_on_a_131k_tiny_model_hold_a_small_cache_and_serve_the_engine_text(long_dirs, tmp_path):
    """Default flags on the conftest-shaped model with a 131,072-position config: the start line says a cache under
    1 GiB within the default budget (a quarter of the free RAM; 16 rows x the whole context, 0.5 GiB, where that
    holds it), /metrics reports the same bytes allocated, /v1/models the max model len, and a request (streamed or
    not) answers with `Loaded.generate`'s text and forwards. Catches: the old server printed no cache line and had
    no cache gauge."""
    from blockdiff.load import load_checkpoint

    loaded = load_checkpoint(long_dirs["tiny"])
    tok = loaded.tokenizer
    cfg = loaded.decode_config(mode="S", max_new_tokens=16)
    want = loaded.generate([tok.encode("add 12+34=")], cfg)[0]
    with running_server(long_dirs["tiny"], log=tmp_path / "server.log") as url:
        line = start_line(tmp_path / "server.log")
        assert line["gib"] < 1.0 and line["rows"] == 16 and line["bpp"] == 256, line
        assert "25% of" in (tmp_path / "server.log").read_text() and line["gib"] <= line["budget_gib"]
        assert line["max_model_len"] == CONTEXT or line["budget_gib"] < 0.6  # the whole context where it fits
        allocated = metric(url, "blockdiff_kv_cache_bytes")
        assert allocated == line["rows"] * line["positions"] * line["bpp"] and allocated < GIB
        [m] = client_of(url).models.list().data
        assert m.model_extra["max_model_len"] == line["max_model_len"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "add 12+34=", "max_tokens": 16, "mode": "S"},
                       timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == tok.decode(want.tokens)
        assert body["blockdiff"]["forwards"] == want.forwards
        text = "".join(c.choices[0].text for c in client_of(url).completions.create(
            model="tiny", prompt="add 12+34=", max_tokens=16, stream=True, extra_body={"mode": "S"}))
        assert text == tok.decode(want.tokens)


def test_plan_for_llama_3_2_1b_fits_the_budget_not_the_whole_context():
    """The plan arithmetic on Llama-3.2-1B's config (no weights): 16 rows x the whole 131,072-position context would
    take 128 GiB in fp32 (4 GiB per layer tensor: the reported failure); within a 4 GiB budget the plan keeps 16 rows
    and cuts the max model len to what fits, within 4 GiB; an explicit --max-model-len keeps its length and takes
    the rows that fit; the default budget is a quarter of the free RAM. Catches: no plan existed (rows x context)."""
    from blockdiff.decode.scheduler import cache_slack
    from blockdiff.model.config import ModelConfig
    from blockdiff.serve.kv_budget import kv_budget, plan_cache

    cfg = ModelConfig(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_heads=32,
                      max_position_embeddings=CONTEXT, **LLAMA_1B_KV)
    slack = cache_slack(32)
    assert 16 * (CONTEXT + slack) * 64 * 1024 > 128 * GIB
    plan = plan_cache(cfg, torch.float32, block_size=32, max_running=16, max_model_len=0, budget=4 * GIB, source="t",
                      min_len=96)
    assert (plan.rows, plan.max_model_len) == (16, 4 * GIB // (16 * 64 * 1024) - slack) and plan.nbytes <= 4 * GIB
    assert plan.max_len(32) == plan.max_model_len and plan.max_len(128) == plan.positions - 129
    plan = plan_cache(cfg, torch.bfloat16, block_size=32, max_running=16, max_model_len=8192, budget=4 * GIB,
                      source="t", min_len=96)
    assert (plan.rows, plan.max_model_len) == (4 * GIB // ((8192 + slack) * 32 * 1024), 8192) == (15, 8192)
    budget, source = kv_budget(0, torch.device("cpu"))
    assert budget > 0 and source.startswith("25% of ")


def test_a_llama_1b_kv_shape_fits_its_budget_and_refuses_a_longer_request(long_dirs, tmp_path):
    """Llama-3.2-1B's K/V shape at 131,072 positions (16 rows x the whole context would be 128 GiB) served with
    --kv-memory 0.25 (the default budget, a quarter of the free RAM, would make this test's memory depend on the
    machine): the server starts with 16 rows x what fits (a max model len of 256 - 67 = 189), exactly 0.25 GiB is
    allocated, a request answers, and a request longer than the max model len (though within the model's context)
    is a 400 context_length_exceeded naming the limit and --max-model-len. Catches the reported bug: the old server
    knew no budget, and its decoding thread died allocating 128 GiB at the first request, which never got an answer
    (reproduced under `ulimit -v`: docs/serving.md)."""
    with running_server(long_dirs["wide"], "--kv-memory", 0.25, log=tmp_path / "server.log") as url:
        line = start_line(tmp_path / "server.log")
        assert line["bpp"] == 64 * 1024 and (line["rows"], line["positions"], line["max_model_len"]) == (16, 256, 189)
        assert metric(url, "blockdiff_kv_cache_bytes") == 0.25 * GIB == line["gib"] * GIB
        r = client_of(url).completions.create(model="wide", prompt="add 1+2=", max_tokens=8,
                                              extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 8
        r = httpx.post(url + "/v1/completions", json={"prompt": "add 1+2=", "max_tokens": line["max_model_len"]},
                       timeout=60)
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
        assert "--max-model-len" in err["message"] and f"max model len of {line['max_model_len']}" in err["message"]
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_explicit_limits_fit_the_rows_and_a_request_over_them_is_a_400(long_dirs, tmp_path):
    """--max-model-len 1024 --kv-memory 0.25 on the Llama-1B K/V shape: a row of 1,091 positions (1024 + the
    scheduler's slack of 67) takes 68.2 MiB, so the budget holds 3 rows (--max-running 16 lowered, said at start).
    A request of 4 rows is a 400 naming --kv-memory, one of 3 rows answers, max_tokens over 1024 and a decode over
    1024 positions are 400s naming --max-model-len. Catches: the old server had neither flag (it would not start)."""
    from blockdiff.decode.scheduler import cache_slack

    assert cache_slack(8) == 67
    with running_server(long_dirs["wide"], "--max-model-len", 1024, "--kv-memory", 0.25,
                        log=tmp_path / "server.log") as url:
        line = start_line(tmp_path / "server.log")
        assert (line["rows"], line["positions"], line["max_model_len"]) == (3, 1024 + cache_slack(8), 1024), line
        assert "--max-running 16 lowered" in (tmp_path / "server.log").read_text()
        body = {"prompt": "add 1+2=", "max_tokens": 8, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json={**body, "n": 4}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert "3 rows" in r.json()["error"]["message"] and "--kv-memory" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={**body, "n": 3}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 1025}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        assert "--max-model-len" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 1020}, timeout=60)
        assert r.status_code == 400 and "--max-model-len" in r.json()["error"]["message"], r.text


def test_memory_flags_out_of_range_are_one_line(long_dirs):
    """A negative --kv-memory is refused before loading; a --max-model-len above the model's context, a budget
    too small for one short request, or one row longer than the budget is one line after loading, naming the flag
    and the numbers, exit 2 (no traceback, nothing served). Catches: the old CLI had no such flags."""
    from cli_helpers import assert_usage_error, run_cli

    wide = long_dirs["wide"]
    for flags, needles in ((["--kv-memory", -1], ["--kv-memory", ">= 0"]),
                           (["--max-model-len", -5], ["--max-model-len", ">= 0"]),
                           (["--max-model-len", CONTEXT + 1], ["--max-model-len", f"<= {CONTEXT}"]),
                           (["--kv-memory", 0.001], ["--kv-memory", "--max-running", "positions per row"]),
                           (["--max-model-len", 8192, "--kv-memory", 0.1], ["--max-model-len 8192", "--kv-memory"])):
        code, _, err = run_cli(["serve", "--model", wide, "--port", 0, "--threads", 1, *flags])
        assert_usage_error(code, err, "serve", *needles)


class InProcess:
    """The app around a loaded checkpoint on a free port, served by uvicorn in a thread (for fault injection)."""

    def __init__(self, loaded, **settings):
        from blockdiff.serve.server import HTTPServer, ServeSettings, create_app

        base = loaded.decode_config()
        self.app = create_app(loaded, ServeSettings(model_name="m", base=base, **settings))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.http = HTTPServer(self.app, grace=0.5)
        self.thread = threading.Thread(target=self.http.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.http.started, 30, "the in-process server started")
        return self

    def __exit__(self, *exc):
        self.http.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def test_a_dead_decoding_loop_ends_every_request_and_health_says_why(tiny_bd_dir, monkeypatch, capfd):
    """The model's forward starts raising (the one injected fault) while one stream decodes and one JSON request
    waits (--max-running 1): the stream ends with an error chunk naming the fault and [DONE], the waiting request
    gets a 500 naming it, a new request a 503 `decoding_loop_failed` naming it, /health a 503 naming it, and stderr
    says it. Catches: the old server's /health said only {"status": "error"} and a new request got a 503 `queue_full`
    without the reason."""
    from blockdiff.load import load_checkpoint

    loaded = load_checkpoint(tiny_bd_dir)
    fault = threading.Event()
    forward = loaded.model.forward

    def failing_forward(*args, **kwargs):
        if fault.is_set():
            raise RuntimeError("injected fault: can't allocate memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", failing_forward)
    with InProcess(loaded, max_running=1) as srv, httpx.Client(timeout=30) as http:
        waiting: dict = {}
        slow = {"prompt": "count", "max_tokens": 480, "stream": True, **SLOW}
        with http.stream("POST", srv.url + "/v1/completions", json=slow) as stream:
            lines = stream.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            t = threading.Thread(target=lambda: waiting.update(r=httpx.post(srv.url + "/v1/completions", timeout=30,
                                                                             json={"prompt": "a", "max_tokens": 4})))
            t.start()
            wait_for(lambda: metric(srv.url, "blockdiff_queue_requests") == 1, 10, "the second request waits")
            fault.set()
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        errors = [e["error"] for e in map(json.loads, (ln[6:] for ln in rest[:-1])) if "error" in e]
        assert errors and "injected fault" in errors[-1]["message"], rest[-3:]
        t.join(timeout=30)
        r = waiting["r"]
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"], r.text
        r = http.post(srv.url + "/v1/completions", json={"prompt": "b", "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "decoding_loop_failed", r.text
        assert "injected fault" in r.json()["error"]["message"]
        h = http.get(srv.url + "/health")
        assert h.status_code == 503 and "injected fault" in h.json()["error"], h.text
    err = capfd.readouterr().err
    assert "[blockdiff serve] the decoding loop failed: RuntimeError: injected fault" in err, err[-2000:]


def test_a_failed_cache_allocation_in_the_loop_answers_the_request_it_was_for(tiny_bd_dir, monkeypatch, capfd):
    """A request with another block size than the server's makes the loop allocate another scheduler's cache; that
    allocation raising (the injected fault, as the 4 GiB allocation did in the report) ends the request with a 500
    naming it, within seconds. Catches the reported hang: the old loop died with the job already out of its
    waiting queue and not yet in a row, so nobody answered it (here: the 20 s client timeout)."""
    import blockdiff.decode.scheduler as scheduler_module
    from blockdiff.load import load_checkpoint

    loaded = load_checkpoint(tiny_bd_dir)
    real_cache = scheduler_module.KVCache
    fault = threading.Event()

    def failing_cache(*args, **kwargs):
        if fault.is_set():
            raise RuntimeError("injected fault: DefaultCPUAllocator: can't allocate memory")
        return real_cache(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "KVCache", failing_cache)
    with InProcess(loaded) as srv, httpx.Client(timeout=20) as http:
        fault.set()
        t0 = time.monotonic()
        r = http.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 4, "block_size": 4})
        assert r.status_code == 500 and "can't allocate memory" in r.json()["error"]["message"], r.text
        assert time.monotonic() - t0 < 10
        h = http.get(srv.url + "/health")
        assert h.status_code == 503 and "can't allocate memory" in h.json()["error"]
    assert "the decoding loop failed" in capfd.readouterr().err

"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): `create_app(loaded, settings)`.

    POST /v1/completions        text (or token-id) prompts; stream or not
    POST /v1/chat/completions   messages rendered with the tokenizer's chat template
    GET  /v1/models, /health, /metrics (Prometheus text), / and /viz (the live denoising view)

Requests are checked here (protocol.py: a 400 naming the field, never a 500 for bad input; a decode longer than
the KV cache's max model len, kv_budget.py, is a 400 naming --max-model-len) and decoded by the batcher's
background thread (batcher.py: continuous batching; if it dies, every request ends with its reason). Streaming
(docs/serving.md): a chunk carries only text that can no longer change, so the concatenated deltas equal the
non-streamed text; `stream_denoise: true` adds the provisional per-step state (masked slots, edits) for viewers,
with empty text deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.chat_template import ANSWER_ENDS, ChatTemplate
from ..decode.config import DecodeConfig
from ..decode.scheduler import check_context, check_prompts, context_needed
from ..decode.spec import check_spec_model
from ..decode.window import check_window_model
from .batcher import Batcher, Job, LoopDead, Overloaded
from .kv_budget import kv_budget, plan_cache
from .metrics import CONTENT_TYPE, Metrics
from .protocol import APIError, GenRequest, chat_messages, completion_prompts, parse_common
from .text import ChoiceText, denoise_state

SHUTTING_DOWN = "the server is shutting down"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/", "/viz")


@dataclass
class ServeSettings:
    model_name: str
    base: DecodeConfig  # the decoding defaults of a request (its max_new_tokens is the default max_tokens)
    ar: bool = False  # decode autoregressively (AR checkpoints, or --ar)
    max_running: int = 16  # rows decoded at once (a request holds prompts x n rows)
    max_queue: int = 256  # requests waiting for rows; more get 503 + Retry-After
    request_timeout: float = 300.0  # seconds from arrival to the last token
    max_body_bytes: int = 1 << 20
    retry_after: int = 1  # seconds, in the Retry-After header of a 503
    max_model_len: int = 0  # positions a request may span (0: the model's context, or what fits the budget)
    kv_memory: float = 0.0  # GiB the KV cache may take (0: kv_budget.KV_MEMORY_FRACTION of the free memory)


class CountRequests:
    """ASGI middleware: blockdiff_requests_total{endpoint,status} for every answer (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def send_status(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()


async def read_json(request: Request, limit: int) -> dict:
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise APIError(413, f"request body of {size} bytes exceeds the limit of {limit} (--max-body-bytes)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes (--max-body-bytes)")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


class Server:
    """One loaded checkpoint behind the API: request checks, the batcher, and the answers (JSON or SSE)."""

    def __init__(self, loaded, settings: ServeSettings):
        self.model, self.tok, self.settings = loaded.model, loaded.tokenizer, settings
        self.mask_id = None if settings.ar else loaded.info.mask_token_id
        p = next(self.model.parameters())
        block_size = 1 if settings.ar else settings.base.block_size
        budget, source = kv_budget(settings.kv_memory, p.device)
        self.plan = plan_cache(self.model.cfg, p.dtype, block_size=block_size, max_running=settings.max_running,
                               max_model_len=settings.max_model_len, budget=budget, source=source,
                               min_len=context_needed(self.model, 1, settings.base, ar=settings.ar))
        self.max_len = self.plan.max_model_len
        self.metrics = Metrics()
        self.batcher = Batcher(self.model, mask_id=self.mask_id, ar=settings.ar, block_size=block_size,
                               plan=self.plan, max_queue=settings.max_queue, metrics=self.metrics)
        self.template = ChatTemplate(self.tok)
        self.closing = False  # set by `drain`: new requests get 503

    # ------------------------------------------------------------------------------ requests
    async def completion(self, request: Request, chat: bool):
        body = await read_json(request, self.settings.max_body_bytes)
        req = parse_common(body, self.settings.base, max_tokens_limit=self.max_len, chat=chat,
                           limit_name="the server's max model len (--max-model-len)")
        if chat:
            req.prompts = [self.tok.encode(self.template.render(chat_messages(body), add_generation_prompt=True))]
        else:
            req.prompts = completion_prompts(body, self.tok.encode)
        self.check(req, "messages" if chat else "prompt")
        return await self.run(request, req)

    def check(self, req: GenRequest, param: str) -> None:
        """The request against the checkpoint: model name, token ids, [MASK], the context, the row limit."""
        s, model = self.settings, self.model
        if req.model and req.model != s.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {s.model_name!r}",
                           param="model", type="not_found_error", code="model_not_found")
        req.cfg = req.cfg if s.ar else req.cfg.for_model(model)
        if not s.ar:  # what the checkpoint cannot decode is refused before anything streams
            try:
                if req.cfg.mode == "spec":
                    check_spec_model(model)
                elif req.cfg.window:
                    check_window_model(model)
            except ValueError as e:
                raise APIError(400, str(e), param="mode" if req.cfg.mode == "spec" else "window") from None
        plan = self.plan
        most = plan.max_len(1 if s.ar else req.cfg.block_size)
        limit = (most, f"the server's max model len of {most} (--max-model-len; the KV cache holds {plan.rows} rows "
                       f"x {plan.positions} positions within --kv-memory)")
        for k, ids in enumerate(req.prompts):
            try:
                check_prompts([ids], model.cfg.vocab_size, self.mask_id)
            except ValueError as e:
                raise APIError(400, f"{param}: {str(e).replace('prompt 0', f'prompt {k}')}", param=param) from None
            try:
                check_context(model, len(ids), req.cfg, ar=s.ar, limit=limit)
            except ValueError as e:
                raise APIError(400, f"{param}: {e}", param=param, code="context_length_exceeded") from None
        rows = len(req.prompts) * req.n
        if rows > plan.rows:
            why = (f"--max-running {plan.max_running} lowered to {plan.rows} by the KV cache budget: raise --kv-memory "
                   "or lower --max-model-len" if plan.rows < plan.max_running else "--max-running")
            raise APIError(400, f"n x prompts = {rows} rows exceeds the {plan.rows} rows the server decodes at once "
                                f"({why})", param="n")

    async def run(self, request: Request, req: GenRequest):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = req.stop + (ANSWER_ENDS if req.chat else ())
        job = Job(req.prompts, req.cfg, req.n, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                  seed=req.seed, stop=stop, decode=self.tok.decode if stop else None, eos_ids=tuple(self.tok.eos_ids),
                  deadline=time.monotonic() + self.settings.request_timeout)
        if self.closing:
            raise APIError(503, SHUTTING_DOWN, type="server_error", code="shutting_down")
        try:
            self.batcher.submit(job)
        except Overloaded as e:
            raise APIError(503, str(e), type="overloaded_error", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after)}) from None
        except LoopDead as e:
            raise APIError(503, f"{e}; the server cannot decode until it is restarted", type="server_error",
                           code="decoding_loop_failed") from None
        except ValueError as e:
            raise APIError(400, str(e), param="n") from None
        text_eos = () if req.cfg.ignore_eos else job.eos_ids  # the text ends at EOS unless EOS is ignored
        texts = [ChoiceText(self.tok, text_eos, job.stop) for _ in range(job.rows)]
        if req.stream:
            return StreamingResponse(self.stream_events(req, job, events, texts), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.collect(request, req, job, events, texts)

    async def collect(self, request: Request, req: GenRequest, job: Job, events: asyncio.Queue, texts):
        """Wait for every choice (cancelling the job if the client goes away); the JSON answer."""
        t0, gens = time.perf_counter(), {}
        try:
            while len(gens) < job.rows:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.batcher.cancel(job)
                        return Response(status_code=499)
                    continue
                if ev[0] == "error":
                    raise event_error(ev)
                if ev[0] == "done":
                    gens[ev[1]] = ev[2]
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise
        self.metrics.latency.observe(time.perf_counter() - t0)
        results = [(c, gens[c], texts[c].final_text(gens[c])) for c in sorted(gens)]
        return JSONResponse(self.response_body(req, job, results))

    async def stream_events(self, req: GenRequest, job: Job, events: asyncio.Queue, texts):
        """The SSE stream: final text deltas, optional denoising state, finish reasons, usage, [DONE]."""
        rid, created, t0, first, done = make_id(req), int(time.time()), time.perf_counter(), True, {}
        try:
            if req.chat:
                for c in range(job.rows):
                    yield sse(self.chunk(req, rid, created, c, "", None, role=True))
            while len(done) < job.rows:
                ev = await events.get()
                if ev[0] == "error":
                    yield sse(event_error(ev).body())
                    break
                kind, c, item = ev
                delta = texts[c].update(item) if kind == "update" else texts[c].final(item)
                if delta:
                    if first:
                        self.metrics.ttft.observe(time.perf_counter() - t0)
                        first = False
                    yield sse(self.chunk(req, rid, created, c, delta, None))
                if kind == "update" and req.stream_denoise:
                    state = denoise_state(self.tok, item, len(job.prompts[c // job.n]), self.mask_id)
                    yield sse({**self.chunk(req, rid, created, c, "", None), "blockdiff": state})
                if kind == "done":
                    done[c] = item
                    yield sse(self.chunk(req, rid, created, c, "", finish_reason(item)))
            if req.include_usage and len(done) == job.rows:
                yield sse({**self.chunk(req, rid, created, 0, "", None), "choices": [], "usage": usage(job, done)})
            yield "data: [DONE]\n\n"
            self.metrics.latency.observe(time.perf_counter() - t0)
        finally:
            if len(done) < job.rows:  # client gone (or error): free the rows before the next step
                self.batcher.cancel(job)

    async def drain(self, grace: float, hurry: Callable[[], bool] = lambda: False) -> None:
        """Shutdown (Ctrl-C): new requests get 503; the running and waiting ones get `grace` seconds (less if
        `hurry()` turns true: a second Ctrl-C) to finish; the rest are ended -- a stream with an error chunk and
        [DONE], a JSON request with a 503 -- so every connection closes cleanly before the server stops."""
        self.closing = True
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while self.batcher.busy and loop.time() < end and not hurry():
            await asyncio.sleep(0.05)
        self.batcher.abort_all(503, f"{SHUTTING_DOWN}: the request was ended after the grace period of {grace:g} s")

    # ------------------------------------------------------------------------------ answers
    def chunk(self, req: GenRequest, rid: str, created: int, c: int, delta: str, reason, role=False) -> dict:
        if req.chat:
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            choice = {"index": c, "delta": d, "logprobs": None, "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": c, "text": delta, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": self.settings.model_name, "choices": [choice]}

    def response_body(self, req: GenRequest, job: Job, results) -> dict:
        gens = {c: g for c, g, _ in results}
        if req.chat:
            choices = [{"index": c, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish_reason(g)} for c, g, text in results]
        else:
            choices = [{"index": c, "text": text, "logprobs": None, "finish_reason": finish_reason(g)}
                       for c, g, text in results]
        fwd, n = sum(g.forwards for g in gens.values()), sum(g.n_generated for g in gens.values())
        return {"id": make_id(req), "object": "chat.completion" if req.chat else "text_completion",
                "created": int(time.time()), "model": self.settings.model_name, "choices": choices,
                "usage": usage(job, gens),
                "blockdiff": {"forwards": fwd, "tpf": round(n / max(fwd, 1), 4),
                              "mode": "ar" if self.settings.ar else req.cfg.mode, "block_size": req.cfg.block_size}}

    def page(self) -> str:
        s = self.settings
        html = resources.files("blockdiff.serve").joinpath("static/viz.html").read_text(encoding="utf-8")
        defaults = {"mode": "ar" if s.ar else s.base.mode, "max_tokens": s.base.max_new_tokens,
                    "block_size": 1 if s.ar else s.base.block_size}
        return html.replace("__MODEL__", s.model_name).replace("__DEFAULTS__", json.dumps(defaults))


def create_app(loaded, settings: ServeSettings) -> FastAPI:
    """The app around one loaded checkpoint (`load.load_checkpoint`)."""
    server = Server(loaded, settings)

    async def lifespan(app):
        server.batcher.start()
        yield
        server.batcher.stop()

    app = FastAPI(title="blockdiff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(CountRequests, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):  # a bug: say so in the same shape
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completion(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.completion(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "blockdiff", "max_model_len": server.max_len}]}

    @app.get("/health")
    async def health():
        failure = server.batcher.failure
        if failure is not None:
            return JSONResponse({"status": "error", "error": failure}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    @app.get("/viz")
    async def viz():
        return HTMLResponse(server.page())

    @app.get("/viz.js")
    async def viz_js():
        js = resources.files("blockdiff.serve").joinpath("static/viz.js").read_text(encoding="utf-8")
        return Response(js, media_type="text/javascript")

    return app


class HTTPServer(uvicorn.Server):
    """uvicorn's server on a socket bound beforehand, with blockdiff's shutdown: stop accepting connections, drain
    the batch (`Server.drain`: finish or end every request within the grace period), then uvicorn's own shutdown,
    which finds every response finished (nothing left to cancel, so no CancelledError tracebacks). The signal that
    stopped it is kept in `stopped_by`, not re-raised: the CLI reports it in one line with its exit code."""

    def __init__(self, app: FastAPI, grace: float):
        # uvicorn's own wait only backs up the drain (a response still being written to a slow client)
        super().__init__(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace + 5))
        self.app, self.grace, self.stopped_by = app, grace, None

    def handle_exit(self, sig, frame) -> None:
        self.stopped_by = self.stopped_by or sig
        super().handle_exit(sig, frame)  # a second Ctrl-C sets force_exit: `drain` stops waiting

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # no new connections while the batch drains
        await self.app.state.server.drain(self.grace, hurry=lambda: self.force_exit)
        await super().shutdown(sockets)


def serve(app: FastAPI, sock: socket.socket, *, grace: float) -> int | None:
    """Serve `app` on the listening socket until a signal; returns the signal (None if none stopped it)."""
    server = HTTPServer(app, grace)
    server.run(sockets=[sock])
    return server.stopped_by


def make_id(req: GenRequest) -> str:
    return ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(job: Job, gens: dict) -> dict:
    p = sum(len(job.prompts[c // job.n]) for c in gens)
    n = sum(g.n_generated for g in gens.values())
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def finish_reason(g) -> str:
    return "length" if g.stop_reason == "length" else "stop"


def event_error(ev: tuple) -> APIError:
    """The batcher's ("error", status, message) event as the API's error."""
    _, status, message = ev
    return APIError(status, message, type={400: "invalid_request_error", 504: "timeout_error"}.get(status, "server_error"))

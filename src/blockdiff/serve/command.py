"""The `blockdiff serve` verb: flags, the listening socket, loading through `load.load_checkpoint`, uvicorn.
Imported by cli.py's parser, so it imports nothing heavy at module level (fastapi and torch are imported when the
verb runs).

Order of a start: the flags are checked, then the port is bound (a busy port is one line and exit 2 at once, not
after the model loaded), then the checkpoint loads, the KV cache is fitted to its budget and allocated
(serve/kv_budget.py: its size is printed on stderr; one that does not fit is one line and exit 2), and the server
runs on that socket. Ctrl-C drains the batch (server.Server.drain: --shutdown-grace seconds to finish, then every
request is ended properly) and exits 130."""

from __future__ import annotations

import errno
import signal
import socket
import sys
from pathlib import Path


def add_serve_parser(sub, add_decoding_args, decode_config, formatter_class=None) -> None:
    """Register `blockdiff serve`. `add_decoding_args` / `decode_config(args)` are the CLI's decoding flags and
    their DecodeConfig (one owner): here they set the defaults of a request that does not set a field."""
    import argparse

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       formatter_class=formatter_class or argparse.ArgumentDefaultsHelpFormatter,
                       description="Serve a checkpoint over HTTP: POST /v1/completions and /v1/chat/completions "
                                   "(stream or not), GET /v1/models, /health, /metrics and the live denoising view at "
                                   "/. Requests join and leave the running batch at every step. The decoding flags "
                                   "below are the defaults of a request (--max-new-tokens: of max_tokens); a "
                                   "request overrides them with body fields (docs/serving.md).")
    s.add_argument("--model", required=True, help="HF folder (converted, or AR: then decoded autoregressively)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--served-model-name", default=None, help="the `model` name clients use (default: folder name)")
    s.add_argument("--max-running", type=int, default=16, help="rows decoded at once (a request uses prompts x n)")
    s.add_argument("--max-model-len", type=int, default=0,
                   help="positions one request may span: prompt + max_tokens, rounded up to whole blocks (0 = the "
                        "model's context, or what --max-running rows of the KV cache budget hold; given, the rows are "
                        "what fits)")
    s.add_argument("--kv-memory", type=float, default=0.0,
                   help="GiB the KV cache may take, allocated at start (0 = a quarter of the memory free after the "
                        "model loaded: RAM, or the GPU's)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a row; more are refused with 503 and Retry-After")
    s.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take (then 504)")
    s.add_argument("--shutdown-grace", type=float, default=3.0,
                   help="seconds in-flight requests get to finish after Ctrl-C; then each is ended (a stream with an "
                        "error chunk and [DONE], others with 503)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (bytes; larger: 413)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    add_decoding_args(s)
    if not any("--threads" in a.option_strings for a in s._actions):  # the decoding flags may own it already
        s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = auto: the free cores)")
    s.set_defaults(func=lambda args: cmd_serve(args, decode_config))


def _check_limits(args) -> None:
    for flag, v, lo in (("--port", args.port, 0), ("--max-running", args.max_running, 1),
                        ("--max-queue", args.max_queue, 1), ("--max-body-bytes", args.max_body_bytes, 1024),
                        ("--threads", args.threads, 0), ("--max-model-len", args.max_model_len, 0)):
        if v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    if not args.kv_memory >= 0 or args.kv_memory == float("inf"):
        raise ValueError(f"--kv-memory must be a number of GiB >= 0 (0 = a quarter of the free memory), "
                         f"got {args.kv_memory}")
    if args.port > 65535:
        raise ValueError(f"--port must be <= 65535, got {args.port}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if not args.shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace must be >= 0 seconds, got {args.shutdown_grace}")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket on host:port, bound before anything loads; a busy port or a bad --host is one line."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses a TIME_WAIT port
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"{host}:{port} is in use (another server?); stop it or pick another --port") from None
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def cmd_serve(args, decode_config) -> int:
    _check_limits(args)
    sock = listen(args.host, args.port)
    try:
        if not Path(args.model).exists():
            raise FileNotFoundError(errno.ENOENT, "model folder not found", args.model)
        base = decode_config(args)  # the decoding flags, checked before the model loads
        return _serve_on(sock, args, base)
    finally:
        sock.close()


def _serve_on(sock: socket.socket, args, base) -> int:
    try:
        from .server import ServeSettings, create_app, serve
    except ImportError as e:
        raise ValueError(f"blockdiff serve needs the serve extra: pip install -e '.[serve]' ({e})") from None
    import torch

    from ..load import load_checkpoint
    from ..machine import set_threads

    threads = set_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    loaded = load_checkpoint(args.model, device=device)
    base = base.for_model(loaded.model)
    ar = args.ar or not loaded.is_diffusion
    name = args.served_model_name or Path(args.model).resolve().name
    settings = ServeSettings(model_name=name, base=base, ar=ar, max_running=args.max_running,
                             max_queue=args.max_queue, request_timeout=args.request_timeout,
                             max_body_bytes=args.max_body_bytes, max_model_len=args.max_model_len,
                             kv_memory=args.kv_memory)
    try:
        app = create_app(loaded, settings)  # fits and allocates the KV cache
    except (RuntimeError, MemoryError) as e:
        oom = isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "allocate" in str(e)  # CPU: "can't allocate"
        if not oom:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot allocate the KV cache ({first}); lower --kv-memory, --max-model-len or "
                         "--max-running") from None
    kind = "AR" if ar else f"block diffusion, mode {base.mode}, B={base.block_size}"
    port = sock.getsockname()[1]  # --port 0: the port the system chose
    print(f"[blockdiff serve] {app.state.server.plan.describe()}", file=sys.stderr, flush=True)
    print(f"[blockdiff serve] {args.model} as {name!r} ({kind}) on {device} ({threads} thread(s)), "
          f"http://{args.host}:{port}/ (viewer), /v1 (OpenAI API)", file=sys.stderr, flush=True)
    stopped_by = serve(app, sock, grace=args.shutdown_grace)
    if stopped_by == signal.SIGINT:
        raise KeyboardInterrupt  # cli.main: one line, exit 130
    return 0

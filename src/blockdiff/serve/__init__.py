"""`blockdiff serve`: an OpenAI-compatible HTTP server with continuous batching and a live denoising view.

command.py (the CLI verb; imports nothing heavy), protocol.py (request fields -> a checked request, the OpenAI error
shape), batcher.py (the background decoding loop over decode/scheduler.py), text.py (streamed text that never
changes), metrics.py (Prometheus), server.py (the FastAPI app), static/ (the viewer page). Needs the `serve` extra
(fastapi, uvicorn, prometheus-client); importing `blockdiff` does not import it. docs/serving.md.
"""

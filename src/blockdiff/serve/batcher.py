"""Continuous batching: one background thread owns the schedulers and the model; requests join and leave between
steps.

The HTTP handlers never touch the model. They `submit` a `Job` (one request: its prompts x n choices become rows)
and read its events from an asyncio queue; `cancel` (client gone, timeout) is honoured before the next step, and
`abort_all` (shutdown) ends every job with an error event. The thread's loop: take new jobs and cancellations from
its inbox, drop jobs past their deadline, admit waiting jobs FIFO while the running rows stay within `max_running`,
then one `step()` of each scheduler that has rows (one per block size in use: the forward is [rows, B]) and hand
every row's StepUpdate / Generation to its job. A full waiting queue refuses new jobs at once (`Overloaded`: the
server answers 503 with Retry-After).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..decode.config import DecodeConfig
from ..decode.scheduler import ARScheduler, Scheduler
from .metrics import Metrics


class Overloaded(Exception):
    """The waiting queue is full."""


@dataclass(eq=False)
class Job:
    prompts: list[list[int]]
    cfg: DecodeConfig
    n: int
    emit: Callable[[tuple], None]  # thread-safe: ("update", choice, StepUpdate) / ("done", choice, Generation) /
    #                                ("error", status, message)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    decode: Callable | None = None
    eos_ids: tuple[int, ...] = ()
    deadline: float = float("inf")  # time.monotonic() after which the job is cancelled
    submitted: float = field(default_factory=time.monotonic)
    rids: list[int] = field(default_factory=list)  # one row per choice, once admitted
    left: int = 0  # choices not finished yet

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def choices(self):
        """(choice index, prompt ids, generator) per row: choice = prompt index * n + k; seed + choice per row."""
        for i, p in enumerate(self.prompts):
            for k in range(self.n):
                c = i * self.n + k
                g = None
                if self.cfg.temperature > 0:
                    g = torch.Generator()
                    g.manual_seed(self.seed + c if self.seed is not None else torch.seed())
                yield c, p, g


class Batcher:
    def __init__(self, model, *, mask_id: int | None, ar: bool, max_running: int, max_queue: int, max_len: int,
                 metrics: Metrics):
        self.model, self.mask_id, self.ar = model, mask_id, ar
        self.max_running, self.max_queue, self.max_len = max_running, max_queue, max_len
        self.metrics = metrics
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.schedulers: dict[int, Scheduler] = {}
        self.rows: dict[int, tuple[Job, int, Scheduler]] = {}  # rid -> (job, choice, scheduler)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._queued = 0  # jobs submitted and not yet admitted (inbox + waiting), under _lock
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="blockdiff-batcher", daemon=True)

    # ------------------------------------------------------------------------------ called from the handlers
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        if self.error is not None or not self.thread.is_alive():
            raise Overloaded("the decoding loop is not running (see the server log); /health says so too")
        if job.rows > self.max_running:
            raise ValueError(f"the request needs {job.rows} rows (prompts x n) but the server runs at most "
                             f"{self.max_running} (--max-running)")
        with self._lock:
            if self._queued >= self.max_queue:
                raise Overloaded(f"the server's queue is full ({self.max_queue} waiting requests, --max-queue)")
            self._queued += 1
        self.metrics.queue.inc()
        self.inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    def abort_all(self, status: int, message: str) -> None:
        """End every job now (running, waiting, or still in the inbox ahead of this call) with an error event."""
        self.inbox.put(("abort", (status, message)))

    @property
    def busy(self) -> bool:
        """Jobs decoding or waiting for rows (read from the handlers' thread: a snapshot)."""
        return bool(self.rows) or self._queued > 0

    # ------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = any(not s.idle for s in self.schedulers.values())
                self._drain(block=not busy and not self.waiting)
                self._expire()
                self._admit()
                for s in list(self.schedulers.values()):
                    if not s.idle:
                        self._step(s)
        except BaseException as e:  # a bug, not bad input: fail every job loudly rather than hang them
            self.error = e
            for job in {j for j, _, _ in self.rows.values()} | set(self.waiting):
                job.emit(("error", 500, f"the decoding loop failed: {type(e).__name__}: {e}"))
            raise

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, arg = item
            if kind == "add":
                self.waiting.append(arg)
            elif kind == "cancel":
                self._drop(arg, "cancelled")
            else:  # "abort": arg is (status, message)
                for job in {j for j, _, _ in self.rows.values()} | set(self.waiting):
                    self._drop(job, "cancelled")
                    job.emit(("error", *arg))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _dequeue(self, _job: Job) -> None:
        with self._lock:
            self._queued -= 1
        self.metrics.queue.dec()

    def _drop(self, job: Job, why: str) -> None:
        """Remove a job's rows now (their cache rows are freed at once) or take it out of the waiting queue."""
        removed = job in self.waiting
        if removed:
            self.waiting.remove(job)
            self._dequeue(job)
        for rid in job.rids:
            if rid in self.rows:
                _, _, sched = self.rows.pop(rid)
                removed = sched.cancel(rid) or removed
        if why == "cancelled" and removed:  # a job that finished meanwhile was not cancelled
            self.metrics.cancelled.inc()
        self._gauges()

    def _expire(self) -> None:
        now = time.monotonic()
        jobs = {j for j, _, _ in self.rows.values()} | set(self.waiting)
        for job in jobs:
            if now > job.deadline:
                self._drop(job, "timeout")
                self.metrics.timeouts.inc()
                job.emit(("error", 504, "the request timed out (--request-timeout)"))

    def _scheduler(self, cfg: DecodeConfig) -> Scheduler:
        B = 1 if self.ar else cfg.block_size
        if B not in self.schedulers:
            if self.ar:
                self.schedulers[B] = ARScheduler(self.model, max_rows=self.max_running, max_len=self.max_len)
            else:
                self.schedulers[B] = Scheduler(self.model, mask_id=self.mask_id, block_size=B,
                                               max_rows=self.max_running, max_len=self.max_len)
        return self.schedulers[B]

    def _admit(self) -> None:
        while self.waiting and len(self.rows) + self.waiting[0].rows <= self.max_running:
            job = self.waiting.popleft()
            self._dequeue(job)
            sched = self._scheduler(job.cfg)
            job.left = job.rows
            try:
                for c, prompt, g in job.choices():
                    rid = next(self._ids)
                    sched.add(rid, prompt, job.cfg, eos_ids=job.eos_ids, generator=g, stop=job.stop,
                              decode=job.decode)
                    job.rids.append(rid)
                    self.rows[rid] = (job, c, sched)
            except ValueError as e:  # checked by the handler already; kept so a slip is a 400, not a hang
                self._drop(job, "error")
                job.emit(("error", 400, str(e)))
        self._gauges()

    def _step(self, sched: Scheduler) -> None:
        out = sched.step()
        self.metrics.forwards.inc()
        self.metrics.row_forwards.inc(len(out.updates))
        for u in out.updates:
            job, c, _ = self.rows[u.row]
            job.emit(("update", c, u))
        for rid, g in out.finished:
            job, c, _ = self.rows.pop(rid)
            self.metrics.finished(g)
            job.left -= 1
            job.emit(("done", c, g))
        if out.finished:
            self._gauges()

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.rows))

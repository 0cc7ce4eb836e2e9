"""Continuous batching: one background thread owns the schedulers and the model; requests join and leave between
steps.

The HTTP handlers never touch the model. They `submit` a `Job` (one request: its prompts x n choices become rows)
and read its events from an asyncio queue; `cancel` (client gone, timeout) is honoured before the next step, and
`abort_all` (shutdown) ends every job with an error event. The thread's loop: take new jobs and cancellations from
its inbox, drop jobs past their deadline, admit waiting jobs FIFO while the running rows stay within `max_running`,
then one `step()` of each scheduler that has rows (one per block size in use: the forward is [rows, B]) and hand
every row's StepUpdate / Generation to its job. A full waiting queue refuses new jobs at once (`Overloaded`: the
server answers 503 with Retry-After).

Memory (serve/kv_budget.py): every scheduler's KV cache is the plan's rows x positions. The one of the server's
block size is allocated when the Batcher is built (at start, in the main thread: too little memory is a one-line
error there); a job of another block size waits until the running batch drains, and the idle cache is freed
before another is allocated, so one cache exists at a time.

If the loop dies (a bug, or a failed allocation), it does not leave anyone waiting: the reason goes to stderr,
every job it holds (running, waiting, being admitted, still in the inbox) ends with a 500 naming it, later
submissions are refused (`LoopDead`: 503 naming it) and `/health` answers 503 with it. The server process stays up
so that the reason can be read there; a supervisor's health check restarts it.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..decode.config import DecodeConfig
from ..decode.scheduler import ARScheduler, Scheduler
from .kv_budget import CachePlan
from .metrics import Metrics


class Overloaded(Exception):
    """The waiting queue is full."""


class LoopDead(Exception):
    """The decoding loop has died; the message says why."""


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
    def __init__(self, model, *, mask_id: int | None, ar: bool, block_size: int, plan: CachePlan, max_queue: int,
                 metrics: Metrics):
        self.model, self.mask_id, self.ar = model, mask_id, ar
        self.plan, self.max_running, self.max_queue = plan, plan.rows, max_queue
        self.metrics = metrics
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.schedulers: dict[int, Scheduler] = {}
        self.rows: dict[int, tuple[Job, int, Scheduler]] = {}  # rid -> (job, choice, scheduler)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._queued = 0  # jobs submitted and not yet admitted (inbox + waiting), under _lock
        self._stop = threading.Event()
        self.error: str | None = None  # why the loop died (set once, under _lock)
        self._admitting: Job | None = None  # the job between the waiting queue and its rows
        self.thread = threading.Thread(target=self._run, name="blockdiff-batcher", daemon=True)
        self._scheduler(1 if ar else block_size)  # the server's cache, allocated now (module docstring)

    # ------------------------------------------------------------------------------ called from the handlers
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        self.thread.join(timeout=10)

    @property
    def failure(self) -> str | None:
        """Why the loop is not running (None while it runs)."""
        if self.error is not None:
            return self.error
        if not self.thread.is_alive():
            return "the decoding loop is not running"
        return None

    def submit(self, job: Job) -> None:
        if job.rows > self.max_running:
            raise ValueError(f"the request needs {job.rows} rows (prompts x n) but the server runs at most "
                             f"{self.max_running} (--max-running)")
        with self._lock:  # with the loop's failure handler: a job is either refused here or ended by it
            if self.failure is not None:
                raise LoopDead(self.failure)
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
                self._step_all()
        except BaseException as e:  # a bug or a failed allocation, not bad input: end every job, say why
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        """The loop died: the reason on stderr, a 500 to every job it holds, LoopDead to later submissions."""
        said = str(e).strip().splitlines()
        reason = f"the decoding loop failed: {type(e).__name__}" + (f": {said[0]}" if said else "")
        with self._lock:  # from here on `submit` refuses: nothing more reaches the inbox
            self.error = reason
        traceback.print_exception(e, file=sys.stderr)
        jobs = {j for j, _, _ in self.rows.values()} | set(self.waiting)
        if self._admitting is not None:  # it had left the waiting queue and may hold no row yet
            jobs.add(self._admitting)
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[0] == "add":
                jobs.add(item[1])
        for job in jobs:
            job.emit(("error", 500, reason))
        self.rows.clear()
        self.waiting.clear()
        self.schedulers.clear()  # frees the cache
        self.metrics.kv_cache_bytes.set(0)
        with self._lock:
            self._queued = 0
        self.metrics.queue.set(0)
        self._gauges()
        print(f"[blockdiff serve] {reason}; {len(jobs)} request(s) ended with a 500, new ones get a 503 and "
              "/health reports it: restart the server", file=sys.stderr, flush=True)

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

    def _scheduler(self, block_size: int) -> Scheduler | None:
        """The scheduler of `block_size`, built (its cache allocated) if needed; None while another block size's
        batch runs (one cache at a time: module docstring)."""
        if block_size not in self.schedulers:
            if any(not s.idle for s in self.schedulers.values()):
                return None
            self.schedulers.clear()  # free the idle cache before allocating the next one
            self.metrics.kv_cache_bytes.set(0)
            max_len = self.plan.max_len(block_size)
            if self.ar:
                sched = ARScheduler(self.model, max_rows=self.plan.rows, max_len=max_len)
            else:
                sched = Scheduler(self.model, mask_id=self.mask_id, block_size=block_size, max_rows=self.plan.rows,
                                  max_len=max_len)
            self.schedulers[block_size] = sched
            self.metrics.kv_cache_bytes.set(sched.cache.nbytes)
        return self.schedulers[block_size]

    def _admit(self) -> None:
        while self.waiting and len(self.rows) + self.waiting[0].rows <= self.max_running:
            sched = self._scheduler(1 if self.ar else self.waiting[0].cfg.block_size)
            if sched is None:  # the head job's block size waits for the running batch to drain
                break
            job = self._admitting = self.waiting.popleft()
            self._dequeue(job)
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
            self._admitting = None
            del sched  # no reference of ours may keep an idle cache alive past the next `_scheduler`
        self._gauges()

    def _step_all(self) -> None:
        """One step of each scheduler that has rows (a method, so no local outlives it and keeps a cache alive)."""
        for sched in list(self.schedulers.values()):
            if not sched.idle:
                self._step(sched)

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

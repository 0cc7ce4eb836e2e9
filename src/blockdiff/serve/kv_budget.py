"""The size of the server's KV cache: rows x positions fitted to a memory budget, allocated once, at start.

Why: the scheduler's cache (decode/cache.py) is preallocated, so that no tensor is reallocated while requests
decode, and one cache row holds one request's whole decode. Sized as --max-running rows x the model's whole
context, a Llama-3.2-1B-shaped model (131,072 positions, 64 KiB of K/V per position in fp32) asks for
16 x 131,139 x 64 KiB = 128 GiB, 4 GiB per layer tensor; the decoding thread died allocating it at the first
request (issue 20). So the server fits the cache to a budget instead:

- the budget: `--kv-memory` GiB, by default `KV_MEMORY_FRACTION` of the memory free once the model is loaded
  (RAM: MemAvailable, within a cgroup's memory limit; CUDA: the device's free memory). The rest stays free for
  activations (a prefill's logits are [rows, prompt, vocab]) and, on a CPU, for the rest of the machine;
- the max model len (the positions one request may span: prompt + max_tokens, rounded up to whole blocks):
  `--max-model-len`, by default the model's context when --max-running rows of it fit the budget, else the
  positions per row that fit. Given explicitly, the rows are what fits (at most --max-running), and fewer rows
  are said at start;
- the cache is allocated at start, in the main thread: a budget that cannot be allocated is a one-line error
  before the server answers anything, and a request that does not fit is a 400 naming the limit and its flag.

Growing the cache on demand was not chosen: it would reallocate and copy the cache while requests run (moving an
out-of-memory failure from start to the middle of someone's request), its peak is the same rows x positions, and
the scheduler's rows would have to wait on memory as well as on rows. The price of preallocation: the budget is
held even while the server idles (vLLM and SGLang preallocate their KV pools for the same reason).

One cache at a time: the server keeps one scheduler per block size in use, and every scheduler's cache has the
plan's rows x positions. A request with another block size than the running batch's waits until that batch
drains; the idle cache is freed before the new one is allocated, so the total never exceeds the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..decode.cache import KVCache
from ..decode.scheduler import cache_slack

GIB = 1 << 30
KV_MEMORY_FRACTION = 0.25  # of the memory free after the model loaded: the default --kv-memory
UNKNOWN_FREE_GIB = 4.0  # the default budget where the free memory cannot be read (no /proc/meminfo)


def free_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes free now, what they are) on `device`; None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None, "RAM"
    try:  # a container's limit (cgroup v2) is not in /proc/meminfo
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int((cg / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(avail, 0), "available RAM"


def kv_budget(kv_memory_gib: float, device: torch.device) -> tuple[int, str]:
    """(bytes the KV cache may take, where that number comes from): `--kv-memory` GiB when > 0, else
    KV_MEMORY_FRACTION of the memory free now."""
    if kv_memory_gib > 0:
        return int(kv_memory_gib * GIB), f"--kv-memory {kv_memory_gib:g}"
    free, what = free_memory(device)
    if free is None:
        return int(UNKNOWN_FREE_GIB * GIB), f"a fixed {UNKNOWN_FREE_GIB:g} GiB: the free {what} is unknown here; " \
                                            "set --kv-memory"
    return int(KV_MEMORY_FRACTION * free), f"{KV_MEMORY_FRACTION:.0%} of {free / GIB:.1f} GiB {what}; --kv-memory"


@dataclass(frozen=True)
class CachePlan:
    rows: int  # cache rows = rows decoded at once (--max-running, fewer when the budget holds fewer)
    positions: int  # KV slots per row: max_model_len + the scheduler's slack at the checkpoint's block size
    max_model_len: int  # positions one request may span: prompt + max_tokens, rounded up to whole blocks
    bytes_per_position: int  # K and V of every layer for one token (bytes)
    budget: int  # bytes the cache may take
    source: str  # where the budget comes from (for the start line)
    max_running: int  # the --max-running asked for
    why: str  # what set max_model_len (for the start line)

    @property
    def nbytes(self) -> int:
        """Bytes of one scheduler's cache."""
        return self.rows * self.positions * self.bytes_per_position

    def max_len(self, block_size: int) -> int:
        """The longest decode a scheduler of `block_size` takes within the plan's rows x positions (less than
        max_model_len only for a block size whose slack exceeds the checkpoint's)."""
        return min(self.max_model_len, self.positions - cache_slack(block_size))

    def describe(self) -> str:
        """The start line: the cache's GiB, rows x positions, and where each number comes from."""
        lowered = (f" (--max-running {self.max_running} lowered to {self.rows}: the budget holds {self.rows} rows)"
                   if self.rows < self.max_running else "")
        return (f"KV cache {self.nbytes / GIB:.3f} GiB = {self.rows} rows x {self.positions:,} positions x "
                f"{self.bytes_per_position:,} B{lowered}; max model len {self.max_model_len:,} ({self.why}); budget "
                f"{self.budget / GIB:.2f} GiB ({self.source})")


def plan_cache(cfg, dtype: torch.dtype, *, block_size: int, max_running: int, max_model_len: int, budget: int,
               source: str, min_len: int) -> CachePlan:
    """Fit rows x positions into `budget` bytes (module docstring). `max_model_len` 0 = the model's context or
    what fits; `min_len`: the positions the smallest request needs (a one-token prompt with the default
    max_tokens): a plan below it is refused. Errors name the flags that change the outcome."""
    bpp = KVCache.bytes_per_position(cfg, dtype)
    context = getattr(cfg, "max_position_embeddings", None) or None
    slack = cache_slack(block_size)
    gib = lambda b: f"{b / GIB:.3f} GiB"  # noqa: E731
    if max_model_len:
        if context and max_model_len > context:
            raise ValueError(f"--max-model-len must be <= {context} (the model's context, max_position_embeddings), "
                             f"got {max_model_len}")
        if max_model_len < min_len:
            raise ValueError(f"--max-model-len {max_model_len} is shorter than the {min_len} positions a one-token "
                             "prompt with --max-new-tokens needs; raise it (or lower --max-new-tokens)")
        per_row = (max_model_len + slack) * bpp
        rows = min(max_running, budget // per_row)
        if rows < 1:
            raise ValueError(f"--max-model-len {max_model_len}: one cache row takes {gib(per_row)}, more than the KV "
                             f"cache budget of {gib(budget)} ({source}); lower --max-model-len or raise --kv-memory")
        return CachePlan(rows, max_model_len + slack, max_model_len, bpp, budget, source, max_running,
                         "--max-model-len")
    fit = budget // (max_running * bpp) - slack  # positions per row a decode may span
    length = min(context, fit) if context else fit
    if length < min_len:
        raise ValueError(f"the KV cache budget of {gib(budget)} ({source}) holds {max(fit, 0)} positions per row for "
                         f"--max-running {max_running}, fewer than the {min_len} a one-token prompt with "
                         "--max-new-tokens needs; raise --kv-memory or lower --max-running")
    why = "the model's context" if length == context else f"what the budget holds for {max_running} rows"
    return CachePlan(max_running, length + slack, length, bpp, budget, source, max_running, why)

"""`--trace`: every decoding step's events as JSON lines, for inspection and visualisation.

Line types (one JSON object per line):
  {"type": "meta", "config": {...DecodeConfig...}, "prompts": [[ids]...], "mask_id": .., "eos_ids": [..]}
  {"type": "event", "row": r, "step": s, "block": b, "pos": p, "token": id, "text": "..", "kind": "m2t"|"t2t",
   "conf": c, "prev": id|null}
  {"type": "done", "row": r, "step": s, "tokens": [...], "stop_reason": ".."}
`pos` is the absolute position in the row's canvas (prompt included); `step` counts the row's forwards after
prefill. The file is written to a temporary name and renamed when complete, so a crashed run never leaves a
truncated trace under the requested name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .engine import DecodeConfig, Generation, StepUpdate


class TraceWriter:
    def __init__(self, path: str | Path, cfg: DecodeConfig, prompts: list[list[int]], *, mask_id: int, eos_ids,
                 token_text: Callable[[int], str] | None = None):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(f"--trace: folder {self.path.parent} does not exist")
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.f = open(self.tmp, "w", encoding="utf-8")
        self.token_text = token_text
        self._write({"type": "meta", "config": asdict(cfg), "prompts": prompts, "mask_id": mask_id,
                     "eos_ids": sorted(set(eos_ids))})

    def _write(self, obj) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def __call__(self, u: StepUpdate) -> None:
        for e in u.events:
            line = {"type": "event", "row": u.row, "step": u.step, "block": u.block, "pos": e.pos, "token": e.token,
                    "kind": e.kind, "conf": round(e.conf, 6), "prev": e.prev}
            if self.token_text is not None:
                line["text"] = self.token_text(e.token)
            self._write(line)

    def close(self, generations: list[Generation] | None = None) -> None:
        for r, g in enumerate(generations or []):
            self._write({"type": "done", "row": r, "forwards": g.forwards, "tokens": g.tokens,
                         "stop_reason": g.stop_reason})
        self.f.close()
        if generations is None:  # aborted: keep nothing under the requested name
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)


def read_trace(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

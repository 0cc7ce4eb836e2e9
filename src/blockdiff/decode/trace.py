"""`--trace`: every decoding step's events as JSON lines, for inspection and visualisation.

Line types (one JSON object per line):
  {"type": "meta", "config": {...DecodeConfig...}, "prompts": [[ids]...], "mask_id": .., "eos_ids": [..]}
  {"type": "event", "row": r, "step": s, "block": b, "pos": p, "token": id, "kind": "m2t"|"t2t"|"draft"|"ar", "conf": c,
   "prev": id|null, "text": ".."}
  {"type": "done", "row": r, "forwards": n, "tokens": [...], "stop_reason": ".."}
`pos` is the absolute position in the row's canvas (prompt included); `step` counts the row's forwards after
prefill; `text` is present only when the writer was given `token_text`. The `done` line (one per row, written by
`close`) holds the row's `Generation`: `forwards` after prefill (cache-writing forwards included), the output
`tokens` (trimmed at EOS or a stop string) and its `stop_reason`. The file is written to a temporary name and
renamed when complete, so a crashed run never leaves a truncated trace under the requested name.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..atomic import PendingFile
from .engine import DecodeConfig, Generation, StepUpdate


class TraceWriter:
    def __init__(self, path: str | Path, cfg: DecodeConfig, prompts: list[list[int]], *, mask_id: int, eos_ids,
                 token_text: Callable[[int], str] | None = None):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(f"--trace: folder {self.path.parent} does not exist")
        self.out = PendingFile(self.path)
        self.token_text = token_text
        self._write({"type": "meta", "config": asdict(cfg), "prompts": prompts, "mask_id": mask_id,
                     "eos_ids": sorted(set(eos_ids))})

    def _write(self, obj) -> None:
        self.out.file.write(json.dumps(obj, ensure_ascii=False) + "\n")

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
        if generations is None:  # aborted: keep nothing under the requested name
            self.out.discard()
        else:
            self.out.commit()


def read_trace(path: str | Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return out


def render_trace(lines: list[dict], row: int = 0, token_text=None) -> list[str]:
    """Replay a trace: one text line per step of `row`, showing the generated slots so far with masked slots as
    '_', EOS as '∎' and this step's writes in [brackets] (T2T edits as [old->new]). `token_text(id)` renders a token; the
    trace's own `text` field is used when present."""
    meta = next((x for x in lines if x.get("type") == "meta"), None)
    if meta is None:
        raise ValueError("not a blockdiff trace: no meta line")
    if not 0 <= row < len(meta["prompts"]):
        raise ValueError(f"row {row} is not in this trace (rows 0..{len(meta['prompts']) - 1})")
    P = len(meta["prompts"][row])
    shown: dict[int, str] = {}
    steps: dict[int, list[dict]] = {}
    for x in lines:
        if x.get("type") == "event" and x["row"] == row:
            steps.setdefault(x["step"], []).append(x)

    eos = set(meta.get("eos_ids", []))

    def text(e) -> str:
        if e["token"] in eos:
            return "∎"  # EOS, one cell wide
        if "text" in e:
            return e["text"]
        return token_text(e["token"]) if token_text else str(e["token"])

    out = []
    for step in sorted(steps):
        evs = steps[step]
        marks = {}
        for e in evs:
            new = text(e)
            marks[e["pos"]] = f"[{shown.get(e['pos'], '?')}->{new}]" if e["kind"] == "t2t" else f"[{new}]"
            shown[e["pos"]] = new
        hi = max(shown) + 1 if shown else P
        lo_block = evs[0]["block"] * meta["config"]["block_size"]
        cells = []
        for pos in range(max(P, lo_block), hi):
            cells.append(marks.get(pos, shown.get(pos, "_")))
        if any(e["kind"] in ("ar", "draft") for e in evs):  # a spec step: accepted drafts + the AR token
            n_draft = sum(e["kind"] == "draft" for e in evs)
            counts = f"+{n_draft} draft +{len(evs) - n_draft} ar"
        else:
            n_t2t = sum(e["kind"] == "t2t" for e in evs)
            counts = f"+{len(evs) - n_t2t} m2t {n_t2t} t2t"
        out.append(f"step {step:3d} block {evs[0]['block']:2d} {counts} | " + "".join(cells).replace("\n", "\\n"))
    return out

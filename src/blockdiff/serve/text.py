"""Streamed text that never changes once sent (docs/serving.md, Streaming).

`ChoiceText.update(step_update)` returns the new text of a choice that can no longer change: the row's final
slots (`StepUpdate.n_final`: finished blocks, the current block once final, and with an unmask-only rule the
committed slots before its first [MASK]), cut at the first EOS and at a stop string, minus (a) the last
len(longest stop) - 1 characters while the row runs (a stop string could still complete there) and (b) a trailing
partial UTF-8 character (U+FFFD). `final(generation)` returns the rest of the final text. The final text is the
one the non-streamed response returns (`final_text`), so the concatenated deltas equal it.

`denoise_state` is the opt-in provisional view of one step (`stream_denoise`): every slot of the row so far
(None where masked), this step's writes (M2T / T2T with confidence) and the counters.
"""

from __future__ import annotations

from ..decode.row import find_stop, first_stop


class ChoiceText:
    def __init__(self, tok, eos_ids, stop: tuple[str, ...]):
        self.tok, self.eos, self.stop, self.sent = tok, set(eos_ids), tuple(stop), ""
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def _text(self, tokens: list[int]) -> tuple[str, bool]:
        """Text up to the first EOS and before the first stop string; whether a stop string was found."""
        cut = first_stop(tokens, self.eos)
        text = self.tok.decode(tokens if cut is None else tokens[:cut])
        hit = find_stop(text, self.stop) if self.stop else None
        return (text, False) if hit is None else (text[:hit], True)

    def final_text(self, g) -> str:
        """The choice's text: the generation cut at EOS (already) and before the first stop string."""
        return self._text(g.tokens)[0]

    def update(self, u) -> str:
        text, stopped = self._text(u.tokens[:u.n_final])
        if not stopped and self.hold:
            text = text[:max(0, len(text) - self.hold)]
        return self._advance(text.rstrip("\ufffd"))

    def final(self, g) -> str:
        return self._advance(self.final_text(g))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def denoise_state(tok, u, n_prompt: int, mask_id: int | None) -> dict:
    """One step of one row for the viewer: slot texts (None = masked), writes, counters."""
    slots = [None if t == mask_id else tok.decode([t]) for t in u.tokens]
    eos = set(getattr(tok, "eos_ids", ()))
    return {"step": u.step, "block": u.block, "n_final": u.n_final, "done": u.done, "slots": slots,
            "eos": [i for i, t in enumerate(u.tokens) if t in eos],
            "events": [{"i": e.pos - n_prompt, "kind": e.kind, "conf": round(e.conf, 4), "text": tok.decode([e.token]),
                        "prev": None if e.prev is None else tok.decode([e.prev])} for e in u.events]}


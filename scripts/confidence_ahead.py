"""Why a converted model commits ~1 token per forward: confidence of an answer slot with its left neighbour still
masked vs already committed, on held-out task prompts (issue 9 part 6).

    python scripts/confidence_ahead.py [--model assets/tiny-bd] [--n 200] [--slot 2]

For each prompt (answers of >= slot + 1 tokens, EOS included): the prompt is encoded as the decoder of a
causal-clean checkpoint sees it (causal prefix, the answer block bidirectional), slots before `slot - 1` hold the
true answer, and `slot` is read once with slot - 1 masked and once with it committed. Prints mean confidence,
argmax accuracy and the fractions above the threshold (0.95) and S-mode (0.5) commit levels for both cases.
"""

from __future__ import annotations

import argparse

import torch

from blockdiff.data.tasks import generate_examples
from blockdiff.load import load_checkpoint
from blockdiff.model.masks import dense_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/tiny-bd")
    ap.add_argument("--n", type=int, default=200, help="held-out prompts (seed 7, the development split)")
    ap.add_argument("--slot", type=int, default=2, help="answer slot to read (0 = the AR step from the prompt)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    loaded = load_checkpoint(a.model)
    model, tok, info = loaded.model, loaded.tokenizer, loaded.info
    if info is None or not (info.shift and info.causal_clean):
        raise SystemExit(f"{a.model}: needs a shifted, causal-clean block-diffusion checkpoint (docs/alignment.md)")
    M, B, j = info.mask_token_id, info.block_size, a.slot
    rows = {"left neighbour masked": [], "left neighbour committed": []}
    for ex in generate_examples("heldout", a.n, seed=7):
        p = tok.encode(ex.prompt)
        ans = tok.encode(ex.text)[len(p):] + [tok.eos_id]
        if len(ans) <= j:
            continue
        P = len(p)
        for name, known in (("left neighbour masked", j - 1), ("left neighbour committed", j)):
            canvas = p + [ans[i] if i < known else M for i in range(B)]
            k = torch.arange(len(canvas))
            inside = (k >= P)[:, None] & (k >= P)[None, :]
            mask = (dense_mask("causal", seq_len=len(canvas))[0, 0] | inside)[None, None]
            with torch.no_grad():
                logits = model(torch.tensor([canvas]), mask=mask)[0, P + j - 1]  # shift: slot j from logit j - 1
            logits[M] = float("-inf")
            conf, tok_id = logits.softmax(-1).max(-1)
            rows[name].append((float(conf), int(tok_id) == ans[j]))
    for name, v in rows.items():
        n = len(v)
        print(f"slot {j}, {name}: {n} prompts, mean confidence {sum(c for c, _ in v) / n:.3f}, argmax correct "
              f"{sum(ok for _, ok in v) / n:.3f}, conf > 0.95 {sum(c > 0.95 for c, _ in v) / n:.3f}, "
              f"conf > 0.5 {sum(c > 0.5 for c, _ in v) / n:.3f}")


if __name__ == "__main__":
    main()

"""Training helpers shared by the test modules that run the loop (test_train, test_alignment, test_load)."""

from __future__ import annotations

from pathlib import Path

import torch

from blockdiff.model.hf_io import load_pretrained
from blockdiff.train.recipe import parse_recipe

L = 32  # seq_len of every recipe here

# B=1 (AR-like) -> B=L (MDLM) -> B=4; saves at 3, 6, 9, 10; the embedding noise anneals over the first 8 steps.
THREE_PHASES = [{"block_size": 1, "steps": 3, "lr": 1e-3}, {"block_size": L, "steps": 3, "lr": 2e-3},
                {"block_size": 4, "steps": 4, "lr": 1e-3}]


def make_recipe(model_dir: Path, paths: dict[str, Path], phases=THREE_PHASES, **sections):
    raw = {
        "model": {"path": str(model_dir)},
        "data": {"train": [str(paths["train"])], "valid": [str(paths["valid"])], "seq_len": L, "valid_rows": 8},
        "train": {"batch_size": 4, "eval_every": 3, "save_every": 3, "warmup_steps": 2, "decay_steps": 3,
                  "threads": 1, "device": "cpu"},  # exact equalities are a CPU property
        "noise": {"frac": 0.8},
        "phases": phases,
    }
    for name, fields in sections.items():
        raw.setdefault(name, {}).update(fields)
    return parse_recipe(raw, source="test-recipe")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(folder).state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


def toml_text(raw: dict) -> str:
    """A recipe dict as TOML text (tables of scalars and lists, [[phases]] last): for tests that run the CLI."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for name, table in raw.items():
        if name != "phases":
            lines += [f"[{name}]", *(f"{k} = {value(v)}" for k, v in table.items())]
    for phase in raw.get("phases", []):
        lines += ["[[phases]]", *(f"{k} = {value(v)}" for k, v in phase.items())]
    return "\n".join(lines) + "\n"

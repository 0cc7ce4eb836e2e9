"""Config-field markers shared by the objective and decoding configs.

A config dataclass (`DiffusionLossConfig`, `DPOConfig`, `DecodeConfig`, ...) is also the recipe section that sets
it (train/recipe.py): its fields are what a recipe may write, with their defaults, units and checks stated once,
on the class. A few fields are not the user's to set in a recipe: they come from the checkpoint or the phase at
run time (the [MASK] id, the block size, the label alignment). Those are declared with `runtime()`: the recipe
parser refuses them, and the run fills them with `dataclasses.replace` before the config is used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

RUNTIME = "runtime"


def runtime(default: Any = None, *, default_factory=None) -> Any:
    """A field filled at run time from the checkpoint or the phase, never from a recipe."""
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={RUNTIME: True})
    return dataclasses.field(default=default, metadata={RUNTIME: True})


def is_runtime(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(RUNTIME))


def require_bound(cfg, *names: str) -> None:
    """Raise when a runtime field the caller needs was never filled (a config taken straight from a recipe)."""
    missing = [n for n in names if getattr(cfg, n) is None]
    if missing:
        raise ValueError(f"{type(cfg).__name__}: {', '.join(missing)} not set; these come from the checkpoint or "
                         "the phase (dataclasses.replace(cfg, ...) before use)")

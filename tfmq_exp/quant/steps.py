"""The sampling-step index that per-step (FSC) activation tables are looked up with.

The sampler enters ``step_context(i)`` around each model call; quantizers with per-step
tables read ``current_step()``. An index into a tensor, not a state-dict reload per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_STEP: list[int | None] = [None]


def current_step() -> int | None:
    return _STEP[0]


@contextlib.contextmanager
def step_context(step: int | None) -> Iterator[None]:
    prev = _STEP[0]
    _STEP[0] = step
    try:
        yield
    finally:
        _STEP[0] = prev

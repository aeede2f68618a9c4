"""Stop a run where non-finite numbers first appear, instead of writing results that look fine.

A NaN in a weight, a calibration sample or a loss spreads silently through everything after it;
reporting it at its source (one line, exit 2) is the only place the user can act on it.
"""

from __future__ import annotations

import torch

from tfmq_exp.errors import UserError


class NonFiniteError(UserError):
    """A tensor holds NaN or Inf values (exit code 2, like every user error)."""


def count_non_finite(t: torch.Tensor) -> tuple[int, int]:
    """(number of NaN values, number of +-Inf values) in ``t``; integer tensors have none."""
    if not (t.is_floating_point() or t.is_complex()):
        return 0, 0
    t = t.detach()
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def require_finite(t: torch.Tensor, what: str, fix: str | None = None) -> None:
    """Raise NonFiniteError (one line: what, how many NaN/Inf of how many, the fix) unless ``t`` is finite."""
    if not (t.is_floating_point() or t.is_complex()):
        return
    if bool(torch.isfinite(t.detach()).all()):
        return
    n_nan, n_inf = count_non_finite(t)
    fix = fix or "check the inputs and settings that produce it (e.g. weights file, learning rate, bit width)"
    raise NonFiniteError(
        f"{what} is not finite: {n_nan} NaN and {n_inf} Inf of {t.numel()} values. Fix: {fix}"
    )

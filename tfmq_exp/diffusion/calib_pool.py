"""The calibration record and the pools recipes draw from it, with the conditioning of every entry.

A record holds every step's model input x_t of N trajectories. For a conditional model it also holds
each trajectory's context (class or prompt encoder states) and the null context; with classifier-free
guidance every x_t enters the pools twice, with its context c and with the null context uc, as the
official generators store them (entries interleaved c, uc per trajectory, so a prefix of a step keeps
both halves). Pools keep a context index per entry, not a copy of the context, so a Stable Diffusion
pool of 77x768 states stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn


class Batch(NamedTuple):
    """Model inputs of one mini-batch: x (B, C, H, W), t (B,), step indices (B,), context (B, L, D) or None."""

    x: torch.Tensor
    t: torch.Tensor
    step: torch.Tensor
    ctx: torch.Tensor | None


def call_model(model: nn.Module, b: Batch) -> Any:
    """``model(x, t)``, with ``encoder_hidden_states`` when the batch carries a context."""
    if b.ctx is None:
        return model(b.x, b.t)
    return model(b.x, b.t, encoder_hidden_states=b.ctx)


@dataclass
class CalibRecord:
    """xs: (S, N, C, H, W) model inputs at each of the S steps; ts: (S,) their time steps.

    contexts: (N + 1, L, D) each trajectory's context and, last, the null context (conditional models);
    guided: every x_t is also a pool entry with the null context (classifier-free guidance).
    """

    xs: torch.Tensor
    ts: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)  # mode, model_calls, wall_s of making it
    contexts: torch.Tensor | None = None
    guided: bool = False

    @property
    def num_steps(self) -> int:
        return self.xs.shape[0]

    @property
    def entries_per_step(self) -> int:
        return self.xs.shape[1] * (2 if self.guided else 1)

    def pool(self, step_every: int = 1, per_step: int | None = None, steps: list[int] | None = None) -> CalibPool:
        """Keep the steps ``steps`` (default: every ``step_every``-th from 0) and ``per_step`` entries of each."""
        chosen = list(steps) if steps is not None else list(range(0, self.num_steps, max(1, step_every)))
        m = self.entries_per_step if per_step is None else min(per_step, self.entries_per_step)
        k = torch.arange(m)
        traj = k // 2 if self.guided else k  # entry -> trajectory
        step = torch.tensor(chosen).repeat_interleave(m)
        x = self.xs[step, traj.repeat(len(chosen))]
        ctx_idx = None
        if self.contexts is not None:
            null = self.contexts.shape[0] - 1
            per = torch.where(k % 2 == 1, torch.full_like(k, null), traj) if self.guided else traj
            ctx_idx = per.repeat(len(chosen))
        return CalibPool(x=x, t=self.ts[step], step=step, ctx_idx=ctx_idx, contexts=self.contexts)


@dataclass
class CalibPool:
    """A flat set of model inputs: x (M, C, H, W), t (M,), the sampling-step index of each, and for
    conditional models the row of ``contexts`` each entry is called with."""

    x: torch.Tensor
    t: torch.Tensor
    step: torch.Tensor
    ctx_idx: torch.Tensor | None = None
    contexts: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx: torch.Tensor) -> CalibPool:
        ci = None if self.ctx_idx is None else self.ctx_idx[idx]
        return CalibPool(self.x[idx], self.t[idx], self.step[idx], ci, self.contexts)

    def shuffled(self, n: int | None, seed: int) -> CalibPool:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        return self.subset(perm[: n if n is not None else len(self)])

    def to(self, device: torch.device | str) -> CalibPool:
        ctx = None if self.contexts is None else self.contexts.to(device)
        return CalibPool(self.x.to(device), self.t.to(device), self.step, self.ctx_idx, ctx)

    def batch(self, sl: slice | torch.Tensor) -> Batch:
        ctx = None
        if self.contexts is not None:
            ctx = self.contexts[self.ctx_idx[sl].to(self.contexts.device)]
        return Batch(self.x[sl], self.t[sl], self.step[sl], ctx)

    def batches(self, batch_size: int):  # noqa: ANN201
        for i in range(0, len(self), batch_size):
            yield self.batch(slice(i, i + batch_size))

    def all(self) -> Batch:
        return self.batch(slice(None))

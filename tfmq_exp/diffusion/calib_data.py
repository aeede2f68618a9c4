"""Calibration data in one pass: N FP trajectories, every step's (x_t, t) recorded once.

The official TFMQ code re-denoises from scratch for every step (O(T^2) model calls); one
recorded set of trajectories gives the same per-step distributions for O(T). The record is
cached under a hash of everything that determines it and subsampled by each recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tfmq_exp.diffusion.sampling import ModelFn, Sampler

log = logging.getLogger(__name__)


@dataclass
class CalibRecord:
    """xs: (S, N, C, H, W) model inputs at each of the S steps; ts: (S,) their time steps."""

    xs: torch.Tensor
    ts: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.xs.shape[0]

    def pool(self, step_every: int = 1, per_step: int | None = None, steps: list[int] | None = None) -> CalibPool:
        """Keep the steps ``steps`` (default: every ``step_every``-th from 0) and ``per_step`` samples of each."""
        chosen = list(steps) if steps is not None else list(range(0, self.num_steps, max(1, step_every)))
        n = self.xs.shape[1] if per_step is None else min(per_step, self.xs.shape[1])
        x = self.xs[chosen, :n].reshape(-1, *self.xs.shape[2:])
        step = torch.tensor(chosen).repeat_interleave(n)
        return CalibPool(x=x, t=self.ts[step], step=step)


@dataclass
class CalibPool:
    """A flat set of model inputs: x (M, C, H, W), t (M,), and the sampling-step index of each."""

    x: torch.Tensor
    t: torch.Tensor
    step: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx: torch.Tensor) -> CalibPool:
        return CalibPool(self.x[idx], self.t[idx], self.step[idx])

    def shuffled(self, n: int | None, seed: int) -> CalibPool:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        return self.subset(perm[: n if n is not None else len(self)])

    def batches(self, batch_size: int):  # noqa: ANN201
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size], self.t[i : i + batch_size], self.step[i : i + batch_size]


def record_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def collect(
    model_fn: ModelFn, sampler: Sampler, n: int, image_shape: tuple[int, ...], seed: int, batch_size: int
) -> CalibRecord:
    """Run ``n`` FP trajectories and keep every step's input."""
    xs = torch.empty(sampler.num_steps, n, *image_shape)
    offset = [0]

    def record(i: int, x: torch.Tensor, t: int) -> None:
        xs[i, offset[0] : offset[0] + x.shape[0]] = x
        if i == sampler.num_steps - 1:
            offset[0] += x.shape[0]

    sampler.sample(model_fn, n, image_shape, seed, batch_size, record=record, desc="calib trajectories")
    return CalibRecord(xs=xs, ts=torch.tensor(sampler.timesteps, dtype=torch.long))


def load_or_collect(
    cache_dir: Path | None,
    key_parts: dict[str, Any],
    model_fn: ModelFn,
    sampler: Sampler,
    n: int,
    image_shape: tuple[int, ...],
    seed: int,
    batch_size: int,
) -> tuple[CalibRecord, bool]:
    """The cached record for ``key_parts`` if present, else collect it and cache it. Returns (record, hit)."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / f"calib_{record_key(key_parts)}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            d = load_file(str(path))
            log.info("calibration record: cache hit %s", path)
            return CalibRecord(xs=d["xs"], ts=d["ts"]), True
        except Exception as err:  # a damaged cache entry is rebuilt, never trusted
            log.warning("ignoring unreadable calibration cache %s (%s)", path, err)
    rec = collect(model_fn, sampler, n, image_shape, seed, batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(
            {"xs": rec.xs.contiguous(), "ts": rec.ts}, str(tmp), metadata={"key": json.dumps(key_parts, default=str)}
        )
        tmp.replace(path)
        log.info("calibration record: cached %s", path)
    return rec, False

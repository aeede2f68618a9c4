"""Calibration data: FP trajectories, every step's model input (x_t, t) recorded.

Two modes (``calib.mode``):

* ``one_pass`` (default): N trajectories, each step's input kept as the sampler passes it: O(T)
  model calls per trajectory.
* ``official``: as TFMQ-DM's released generator, every step k gets N trajectories of its own,
  fresh noise denoised from T until just before the k-th model call: O(T^2) model calls. Same
  per-step distributions, different samples; for exact reproduction of the official pool.

The record is cached under a hash of everything that determines it and subsampled by each
recipe. Calibration noise has its own streams (``seeds.PURPOSES``): it never equals the
evaluation noise, whatever the two seeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tfmq_exp.checks import require_finite
from tfmq_exp.diffusion.sampling import ModelFn, Sampler

log = logging.getLogger(__name__)


@dataclass
class CalibRecord:
    """xs: (S, N, C, H, W) model inputs at each of the S steps; ts: (S,) their time steps."""

    xs: torch.Tensor
    ts: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)  # mode, model_calls, wall_s of making it

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


def state_digest(module: torch.nn.Module) -> str:
    """Hash of a module's weights (names, dtypes, shapes, bytes): the same weights, the same key,
    wherever they were loaded from (a diffusers folder, a hub id, a converted original checkpoint)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


MODES = ("one_pass", "official")


def collect(
    model_fn: ModelFn, sampler: Sampler, n: int, image_shape: tuple[int, ...], seed: int, batch_size: int
) -> CalibRecord:
    """Run ``n`` FP trajectories and keep every step's input (``n * S`` model calls)."""
    xs = torch.empty(sampler.num_steps, n, *image_shape)
    offset = [0]

    def record(i: int, x: torch.Tensor, t: int) -> None:
        xs[i, offset[0] : offset[0] + x.shape[0]] = x
        if i == sampler.num_steps - 1:
            offset[0] += x.shape[0]

    t0 = time.perf_counter()
    sampler.sample(model_fn, n, image_shape, seed, batch_size, record=record, desc="calib trajectories",
                   purpose="calib")
    stats = {"mode": "one_pass", "model_calls": n * sampler.num_steps, "wall_s": time.perf_counter() - t0}
    return CalibRecord(xs=xs, ts=torch.tensor(sampler.timesteps, dtype=torch.long), stats=stats)


def collect_official(
    model_fn: ModelFn, sampler: Sampler, n: int, image_shape: tuple[int, ...], seed: int, batch_size: int
) -> CalibRecord:
    """TFMQ's generator: for each step k, ``n`` fresh trajectories stopped before their k-th model call.

    ``n * S (S - 1) / 2`` model calls (k calls for step k); each step draws from its own noise streams.
    """
    S = sampler.num_steps
    xs = torch.empty(S, n, *image_shape)
    t0 = time.perf_counter()
    calls = 0
    bar = tqdm(total=S * n, desc="calib (official, per step)", unit="img", mininterval=2.0)
    for k in range(S):
        for b0 in range(0, n, batch_size):
            idx = range(b0, min(b0 + batch_size, n))
            x = sampler.sample_batch(model_fn, image_shape, seed, idx, purpose="calib", stop_before=k,
                                     stream_step=k)
            xs[k, b0 : b0 + len(idx)] = x.cpu()
            calls += k * len(idx)
            bar.update(len(idx))
    bar.close()
    stats = {"mode": "official", "model_calls": calls, "wall_s": time.perf_counter() - t0}
    return CalibRecord(xs=xs, ts=torch.tensor(sampler.timesteps, dtype=torch.long), stats=stats)


def load_or_collect(
    cache_dir: Path | None,
    key_parts: dict[str, Any],
    model_fn: ModelFn,
    sampler: Sampler,
    n: int,
    image_shape: tuple[int, ...],
    seed: int,
    batch_size: int,
    mode: str = "one_pass",
) -> tuple[CalibRecord, bool]:
    """The cached record for ``key_parts`` if present, else collect it and cache it. Returns (record, hit).

    A record holding NaN/Inf stops the run (the FP model is broken) and is never cached.
    """
    from safetensors.torch import load_file, save_file

    if mode not in MODES:
        raise ValueError(f"unknown calibration mode '{mode}' (use one of {list(MODES)})")
    key_parts = {**key_parts, "mode": mode}
    path = cache_dir / f"calib_{record_key(key_parts)}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            from safetensors import safe_open

            d = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                stats = json.loads((f.metadata() or {}).get("stats", "{}"))
            require_finite(d["xs"], f"cached calibration record {path}")
            log.info("calibration record: cache hit %s", path)
            return CalibRecord(xs=d["xs"], ts=d["ts"], stats=stats), True
        except Exception as err:  # a damaged cache entry is rebuilt, never trusted
            log.warning("ignoring unreadable calibration cache %s (%s)", path, err)
    collector = collect_official if mode == "official" else collect
    rec = collector(model_fn, sampler, n, image_shape, seed, batch_size)
    require_finite(rec.xs, "calibration record (the FP model's sampling trajectories)",
                   "the FP model produces non-finite outputs: check its weights and the sampler settings")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{time.time_ns()}.tmp")
        meta = {"key": json.dumps(key_parts, default=str), "stats": json.dumps(rec.stats)}
        save_file({"xs": rec.xs.contiguous(), "ts": rec.ts}, str(tmp), metadata=meta)
        tmp.replace(path)
        log.info("calibration record: cached %s", path)
    return rec, False

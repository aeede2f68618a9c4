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
from pathlib import Path
from typing import Any

import torch

from tfmq_exp import cache_io
from tfmq_exp.checks import require_finite
from tfmq_exp.diffusion.calib_pool import Batch, CalibPool, CalibRecord, call_model
from tfmq_exp.diffusion.sampling import Conditioning, ModelFn, Sampler
from tfmq_exp.progress import progress_bar as tqdm

__all__ = ["Batch", "CalibPool", "CalibRecord", "call_model", "collect", "collect_official", "load_or_collect"]

log = logging.getLogger(__name__)


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


def _conditioned(rec: CalibRecord, cond: Conditioning | None) -> CalibRecord:
    """Attach the trajectories' contexts (and the null context last) to a record of a conditional model."""
    if cond is not None:
        null = cond.null if cond.null is not None else torch.zeros_like(cond.context[:1])
        rec.contexts = torch.cat([cond.context[: rec.xs.shape[1]], null]).cpu()
        rec.guided = cond.guided
    return rec


def collect(
    model_fn: ModelFn, sampler: Sampler, n: int, image_shape: tuple[int, ...], seed: int, batch_size: int,
    cond: Conditioning | None = None,
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
                   purpose="calib", cond=cond)
    stats = {"mode": "one_pass", "model_calls": n * sampler.num_steps, "wall_s": time.perf_counter() - t0}
    return _conditioned(CalibRecord(xs=xs, ts=torch.tensor(sampler.timesteps, dtype=torch.long), stats=stats), cond)


def collect_official(
    model_fn: ModelFn, sampler: Sampler, n: int, image_shape: tuple[int, ...], seed: int, batch_size: int,
    cond: Conditioning | None = None,
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
                                     stream_step=k, cond=cond)
            xs[k, b0 : b0 + len(idx)] = x.cpu()
            calls += k * len(idx)
            bar.update(len(idx))
    bar.close()
    stats = {"mode": "official", "model_calls": calls, "wall_s": time.perf_counter() - t0}
    return _conditioned(CalibRecord(xs=xs, ts=torch.tensor(sampler.timesteps, dtype=torch.long), stats=stats), cond)


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
    cond: Conditioning | None = None,
) -> tuple[CalibRecord, bool]:
    """The cached record for ``key_parts`` if present, else collect it and cache it. Returns (record, hit).

    A record holding NaN/Inf stops the run (the FP model is broken) and is never cached. Jobs racing for
    one key: the first collects under the entry's lock, the others wait and read its record; a damaged
    entry is logged and collected again (``tfmq_exp.cache_io``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode '{mode}' (use one of {list(MODES)})")
    key_parts = {**key_parts, "mode": mode}
    collector = collect_official if mode == "official" else collect
    if cache_dir is None:
        return _collect_checked(collector, model_fn, sampler, n, image_shape, seed, batch_size, cond), False
    path = Path(cache_dir) / f"calib_{record_key(key_parts)}.safetensors"
    rec = cache_io.read_or_miss(path, _read_record, "calibration record")
    if rec is not None:
        log.info("calibration record: cache hit %s", path)
        return rec, True
    with cache_io.locked(path, "calibration record"):
        rec = cache_io.read_or_miss(path, _read_record, "calibration record")  # written while we waited?
        if rec is not None:
            log.info("calibration record: cache hit %s (written by another job)", path)
            return rec, True
        rec = _collect_checked(collector, model_fn, sampler, n, image_shape, seed, batch_size, cond)
        meta = {"key": json.dumps(key_parts, default=str), "stats": json.dumps(rec.stats),
                "guided": "true" if rec.guided else "false"}
        tensors = {"xs": rec.xs, "ts": rec.ts}
        if rec.contexts is not None:
            tensors["contexts"] = rec.contexts
        cache_io.save_safetensors(path, tensors, metadata=meta)
    log.info("calibration record: cached %s", path)
    return rec, False


def _collect_checked(collector, model_fn, sampler, n, image_shape, seed, batch_size, cond) -> CalibRecord:
    rec = collector(model_fn, sampler, n, image_shape, seed, batch_size, cond)
    require_finite(rec.xs, "calibration record (the FP model's sampling trajectories)",
                   "the FP model produces non-finite outputs: check its weights and the sampler settings")
    return rec


def _read_record(path: Path) -> CalibRecord:
    """A cached record; raises if the file is truncated, corrupt or holds non-finite values."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    require_finite(d["xs"], f"cached calibration record {path}")
    return CalibRecord(xs=d["xs"], ts=d["ts"], stats=json.loads(md.get("stats", "{}")),
                       contexts=d.get("contexts"), guided=md.get("guided") == "true")

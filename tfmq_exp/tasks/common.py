"""Pieces every task shares: the sampler, the calibration record, seeding, timing."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from tfmq_exp.diffusion.calib_data import CalibRecord, file_digest, load_or_collect
from tfmq_exp.diffusion.sampling import Sampler, unet_fn
from tfmq_exp.models.loader import LoadedModel, resolve_weights_path

log = logging.getLogger("tfmq_exp")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - t0, 3)


def build_sampler(cfg: DictConfig, model: LoadedModel) -> Sampler:
    s = cfg.sampler
    return Sampler(
        model.scheduler_config, kind=s.kind, steps=int(s.steps), eta=float(s.eta), skip=s.skip, clip_x0=bool(s.clip_x0)
    )


def image_shape(model: LoadedModel) -> tuple[int, int, int]:
    return (model.channels, model.image_size, model.image_size)


def model_identity(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the FP model's weights, for cache keys."""
    m = cfg.model
    if m.source == "embedded":
        return {"name": m.name, "weights": file_digest(resolve_weights_path(m.weights, f"{m.name}_unet.safetensors"))}
    return {"name": m.name, "pretrained": m.pretrained, "subfolder": m.subfolder}


def calib_record(cfg: DictConfig, model: LoadedModel, sampler: Sampler) -> tuple[CalibRecord, bool]:
    c = cfg.calib
    key = {
        "model": model_identity(cfg),
        "sampler": sampler.describe(),
        "n": int(c.n_trajectories),
        "seed": int(c.seed),
        "shape": image_shape(model),
        "version": 1,
    }
    cache = Path(cfg.paths.cache_dir).expanduser() / "calib" if c.cache else None
    return load_or_collect(
        cache,
        key,
        unet_fn(model.unet),
        sampler,
        int(c.n_trajectories),
        image_shape(model),
        int(c.seed),
        int(c.batch_size),
    )


def bits_label(recipe: Any) -> str:
    if recipe is None or (not recipe.weight.enabled and not recipe.act.enabled):
        return "fp"
    w = recipe.weight.n_bits if recipe.weight.enabled else 32
    a = recipe.act.n_bits if recipe.act.enabled else 32
    return f"w{w}a{a}"


def sampling_fabric(cfg: DictConfig) -> Any:
    """A launched Fabric when trainer.devices asks for several processes (sharded sampling), else None."""
    if str(cfg.trainer.devices) in ("1", "None"):
        return None
    from tfmq_exp.recon.engine import FabricRunner

    t = cfg.trainer
    return FabricRunner(t.accelerator, t.devices, t.strategy, t.precision, t.num_nodes).fabric

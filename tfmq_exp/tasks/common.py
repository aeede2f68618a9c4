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

from tfmq_exp.diffusion.calib_data import CalibRecord, load_or_collect, state_digest
from tfmq_exp.diffusion.sampling import Sampler, unet_fn
from tfmq_exp.models.loader import LoadedModel, resolve_weights_path

log = logging.getLogger("tfmq_exp")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


STAGES = {"calib_data_s": "the calibration record", "quantization_s": "quantization",
          "sampling_s": "sampling", "evaluation_s": "evaluation"}
_stage = ["start-up"]


def current_stage() -> str:
    """What the run is doing now, for the message of an interrupt."""
    return _stage[0]


_interrupted = [False]


def _on_sigint(signum: int, frame: Any) -> None:
    _interrupted[0] = True
    raise KeyboardInterrupt


def install_sigint_handler() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: a KeyboardInterrupt raised inside a
    finalizer (a ``__del__`` running at that moment) is printed as "Exception ignored" and lost, and the run
    would go on to write results; the next stage boundary raises it again."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def set_stage(name: str) -> None:
    if _interrupted[0]:  # a Ctrl-C whose KeyboardInterrupt was swallowed: stop before the next stage
        raise KeyboardInterrupt
    _stage[0] = name
    log.info("stage: %s", name)


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    set_stage(STAGES.get(key, key.removesuffix("_s")))
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - t0, 3)


def preflight(cfg: DictConfig) -> Path:
    """Everything checked before the first expensive stage: ranges, choices, the files later stages need,
    writable output and cache folders; then the thread count. Returns the output folder."""
    from tfmq_exp.config import validate_config
    from tfmq_exp.schema_rules import existing, writable_dir
    from tfmq_exp.threads import configure_threads

    _stage[0] = "start-up"
    paths = validate_config(cfg)
    fixes = {"file": "point it at an existing file (or leave it null for the default)",
             "exists": "point it at an existing file or folder"}
    for key, value, kind in paths:
        if kind == "writable_dir":
            writable_dir(key, value)
        elif key == "ckpt" and cfg.task not in ("sample", "evaluate"):
            continue  # task=quantize writes its own checkpoint
        elif key == "model.weights":
            resolve_weights_path(value, "")  # the loader's own message, with how to train the weights
        else:
            fix = "pass a quantized.safetensors written by task=quantize" if key == "ckpt" else fixes[kind]
            existing(key, value, kind, fix)
    _check_evaluator_inputs(cfg)
    configure_threads()
    return Path(cfg.paths.output_dir)


def _check_evaluator_inputs(cfg: DictConfig) -> None:
    """The evaluator's weights and reference set, which are only read after sampling."""
    from tfmq_exp.errors import UserError
    from tfmq_exp.schema_rules import existing
    from tfmq_exp.tasks.evaluate import reference_spec, samples_needed

    if cfg.task not in ("quantize", "evaluate") or samples_needed(cfg) == 0:
        return
    ev = cfg.evaluator
    if ev.get("inception_weights"):
        existing("evaluator.inception_weights", ev.inception_weights, "file",
                 "point it at TF-Inception weights (.pth, .safetensors or TorchScript) or leave it null")
    ref = ev.get("reference") or reference_spec(cfg)
    key = "evaluator.reference" if ev.get("reference") else "dataset.path"
    if ref is None:
        raise UserError("no reference set for FID: dataset.path and evaluator.reference are null. Fix: set "
                        "dataset.path (or evaluator.reference) to an image folder or ADM .npz, or evaluator=none.")
    if ref != "mnist":
        existing(key, ref, "exists", "point it at an image folder or an ADM .npz, or use evaluator=none")


def checked_model_fn(fn: Any, what: str) -> Any:
    """Wrap ``model_fn(x, t)`` so a non-finite prediction stops sampling at the step where it appears."""
    from tfmq_exp.checks import require_finite

    def wrapped(x: torch.Tensor, t: torch.Tensor, *ctx: torch.Tensor) -> torch.Tensor:
        eps = fn(x, t, *ctx)
        require_finite(eps, f"{what}: the model output at t={int(t.flatten()[0])}",
                       "the weights or the quantized ranges are broken; rerun with traceback=true to see where")
        return eps

    return wrapped


def build_sampler(cfg: DictConfig, model: LoadedModel) -> Sampler:
    s = cfg.sampler
    sampler = Sampler(
        model.scheduler_config, kind=s.kind, steps=int(s.steps), eta=float(s.eta), skip=s.skip, clip_x0=bool(s.clip_x0),
        timestep_offset=int(s.get("timestep_offset", 0)), final_alpha_one=bool(s.get("final_alpha_one", True)),
        guidance=float(s.get("guidance", 1.0)), uniform_steps=str(s.get("uniform_steps", "exact")),
    )
    if sampler.num_steps != int(s.steps) and s.kind != "ddpm":
        log.warning("sampler.steps=%d with stride %d runs %d steps (t = %d ... %d), as the official LDM code does; "
                    "calibration and per-step tables cover all %d", int(s.steps), sampler.num_train // int(s.steps),
                    sampler.num_steps, sampler.timesteps[0], sampler.timesteps[-1], sampler.num_steps)
    return sampler


def image_shape(model: LoadedModel) -> tuple[int, int, int]:
    return (model.channels, model.image_size, model.image_size)


def model_identity(cfg: DictConfig, model: LoadedModel) -> dict[str, Any]:
    """What identifies the FP model, for cache keys: a hash of its loaded weights, not where they came from
    (a diffusers folder whose files change gets a new key; the same weights under two paths share one)."""
    return {"name": cfg.model.name, "weights": state_digest(model.unet)}


def calib_record(cfg: DictConfig, model: LoadedModel, sampler: Sampler) -> tuple[CalibRecord, bool]:
    from tfmq_exp.tasks.conditioning import conditioning_for, conditioning_key

    c = cfg.calib
    cond, info = conditioning_for(cfg, model, int(c.n_trajectories), int(c.seed), classes=c.get("classes"))
    key = {
        "model": model_identity(cfg, model),
        "sampler": sampler.describe(),
        "n": int(c.n_trajectories),
        "seed": int(c.seed),
        "shape": image_shape(model),
        "cond": conditioning_key(info, cond),
        "version": 2,  # 2: calibration noise streams of their own
    }
    cache = Path(cfg.paths.cache_dir).expanduser() / "calib" if c.cache else None
    return load_or_collect(
        cache,
        key,
        checked_model_fn(unet_fn(model.unet), "calibration trajectories"),
        sampler,
        int(c.n_trajectories),
        image_shape(model),
        int(c.seed),
        int(c.batch_size),
        mode=str(c.get("mode", "one_pass")),
        cond=cond,
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

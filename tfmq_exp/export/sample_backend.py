"""task=sample backend=openvino: the sampler's model function backed by an exported model."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from tfmq_exp.diffusion.sampling import Sampler
from tfmq_exp.errors import UserError


def openvino_model_fn(cfg: DictConfig, sampler: Sampler, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(model_fn, meta) for the export in ``export.dir``; its per-step tables must match this schedule.

    A ``per_step`` export is sampled step-major (``sampling_batch``): the sampler denoises
    ``export.chunk`` samples together, so each step's model is compiled once per chunk and kept alone
    in memory, and the runner calls it at ``sampler.batch_size``."""
    from tfmq_exp.export.openvino_backend import OpenVINOUNet, require_openvino

    require_openvino()
    folder = cfg.export.get("dir")
    if not folder:
        raise UserError("backend=openvino needs the folder task=export wrote. Fix: add export.dir=PATH.")
    runner = OpenVINOUNet(folder, cfg.export.precision, int(cfg.export.threads))
    if runner.per_step:  # step-major: one compiled step model at a time, called at the sampler's batch
        runner.max_models, runner.call_batch = 1, int(cfg.sampler.batch_size)
    m = runner.manifest
    if m.get("model") != cfg.model.name:
        raise UserError(f"the export in {folder} is of model '{m.get('model')}'. Fix: add model={m.get('model')}.")
    if m.get("step_tables") != "none" and list(m.get("timesteps") or []) != list(sampler.timesteps):
        n = len(m.get("timesteps") or [])
        raise UserError(
            f"the export in {folder} carries per-step tables for a {n}-step schedule, not this "
            f"{sampler.num_steps}-step one. Fix: sample with sampler.steps={n} (the quantize run's sampler)."
        )
    meta = dict(meta, quantizer=m.get("quantizer"), bits=m.get("bits"), backend="openvino", export_dir=str(folder))
    return runner, meta


def sampling_batch(cfg: DictConfig, model_fn: Any) -> int:
    """The sampler's batch: ``export.chunk`` for a per-step export (step-major), else ``sampler.batch_size``."""
    if getattr(model_fn, "per_step", False):
        return max(int(cfg.export.chunk), int(cfg.sampler.batch_size))
    return int(cfg.sampler.batch_size)

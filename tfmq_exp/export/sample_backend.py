"""task=sample backend=openvino: the sampler's model function backed by an exported model."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from tfmq_exp.diffusion.sampling import Sampler
from tfmq_exp.errors import UserError


def openvino_model_fn(cfg: DictConfig, sampler: Sampler, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(model_fn, meta) for the export in ``export.dir``; its per-step tables must match this schedule."""
    from tfmq_exp.export.openvino_backend import OpenVINOUNet, require_openvino

    require_openvino()
    folder = cfg.export.get("dir")
    if not folder:
        raise UserError("backend=openvino needs the folder task=export wrote. Fix: add export.dir=PATH.")
    runner = OpenVINOUNet(folder, cfg.export.precision, int(cfg.export.threads))
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

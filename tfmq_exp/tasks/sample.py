"""task=sample: images from the FP model, or from a quantized checkpoint (ckpt=PATH) with no
calibration data. Same seed and sampler as the quantize run: the same images, bit for bit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tfmq_exp.checks import require_finite
from tfmq_exp.diffusion.sampling import to_uint8, unet_fn
from tfmq_exp.diffusion.sharding import sample_sharded
from tfmq_exp.errors import UserError
from tfmq_exp.models.attention import reinstall_attention_quantizers, set_attention_quant_state
from tfmq_exp.models.loader import load_model
from tfmq_exp.quant.frozen import frozen_weights
from tfmq_exp.quant.state import load_quantized, read_header
from tfmq_exp.results import save_rows_png, write_json, write_npz
from tfmq_exp.tasks.common import (
    build_sampler,
    checked_model_fn,
    image_shape,
    sampling_fabric,
    seed_everything,
    timed,
)
from tfmq_exp.tasks.conditioning import conditioning_for, to_images

log = logging.getLogger("tfmq_exp")


def load_checkpoint_model(cfg: DictConfig, path: str) -> tuple[Any, dict[str, Any]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"checkpoint not found: {p}. Fix: pass ckpt=PATH to a quantized.safetensors written by task=quantize."
        )
    try:
        header = read_header(p)
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"cannot read checkpoint {p}: {err}. Fix: point ckpt at a quantized.safetensors from task=quantize."
        ) from None
    meta = header["meta"]
    if meta.get("model") and meta["model"] != cfg.model.name:
        raise UserError(
            f"checkpoint {p} quantizes model '{meta['model']}', not '{cfg.model.name}'. Fix: add model={meta['model']}."
        )
    model = load_model(cfg.model)
    attn = meta.get("attention")
    try:
        if attn:  # the matmul quantizers must exist before their state is loaded
            reinstall_attention_quantizers(model.unet, attn)
        load_quantized(model.unet, p)
        if attn:
            set_attention_quant_state(model.unet, bool(attn["enabled"]))
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"checkpoint {p} does not fit model '{cfg.model.name}': {first}. Fix: use the model it was made for."
        ) from None
    for name, value in model.unet.state_dict().items():
        require_finite(value, f"checkpoint {p}: tensor '{name}'",
                       "the checkpoint is damaged; quantize again with task=quantize")
    return model, meta


NEUTRAL_SAMPLER = {"guidance": 1.0}  # sampler fields added after the first checkpoints, at their no-op value


def check_schedule(meta: dict[str, Any], timesteps: list[int], unet: Any,
                   sampler: dict[str, Any] | None = None) -> None:
    """Per-step tables are indexed by step and were fitted to one sampler's activations: sampling with
    another kind, step count, skip, eta or guidance would read tables made for other inputs.

    ``sampler`` is ``Sampler.describe()`` of this run; every field it shares with the checkpoint's must match.
    """
    from tfmq_exp.quant.quantizer import UniformQuantizer

    if not any(isinstance(m, UniformQuantizer) and m.has_step_tables for m in unet.modules()):
        return  # one range per quantizer: any schedule reads the same ranges
    saved = (meta.get("sampler") or {}) if sampler is not None else {}  # no description: timesteps only
    now = sampler or {}
    # a field one side lacks (a checkpoint older than the field) counts as that field's neutral value
    saved = {k: saved.get(k, NEUTRAL_SAMPLER.get(k)) for k in set(saved) | (set(now) & set(NEUTRAL_SAMPLER))}
    diffs = [k for k in sorted(set(saved) | set(now)) if k in saved and k in now and saved[k] != now[k]]
    diffs += [k for k in sorted(set(saved) ^ set(now)) if saved.get(k, now.get(k)) not in (None, False, 0)]
    calibrated = meta.get("timesteps")
    if not diffs and (calibrated is None or list(calibrated) == list(timesteps)):
        return
    if diffs:
        what = "; ".join(f"sampler.{k} is {now.get(k)} here, {saved.get(k)} in the checkpoint" for k in diffs)
        fix = " ".join(f"sampler.{k}={saved[k]}" for k in diffs if k in saved) + " (the quantize run's sampler)"
    else:
        what = (f"the {len(timesteps)} timesteps here differ from the checkpoint's {len(calibrated)} "
                "(the model's training schedule changed)")
        fix = "the model and model.scheduler the checkpoint was quantized with"
    raise UserError(
        f"this checkpoint's per-step activation tables were calibrated with another sampler: {what}. Fix: use {fix}."
    )


def run_sample(cfg: DictConfig, out: Path) -> dict[str, Any]:
    timings: dict[str, float] = {}
    seed_everything(cfg.seed)
    if cfg.ckpt:
        model, meta = load_checkpoint_model(cfg, cfg.ckpt)
    else:
        model, meta = load_model(cfg.model), {"quantizer": "fp", "bits": "fp"}
    sampler = build_sampler(cfg, model)
    check_schedule(meta, sampler.timesteps, model.unet, sampler.describe())
    fabric = sampling_fabric(cfg)
    model.unet.to(fabric.device if fabric else sampler.device)
    model_fn, batch = unet_fn(model.unet), int(cfg.sampler.batch_size)
    if cfg.get("backend", "torch") == "openvino":  # the exported integer model (docs/deploy.md)
        from tfmq_exp.export.sample_backend import openvino_model_fn, sampling_batch

        model_fn, meta = openvino_model_fn(cfg, sampler, meta)
        batch = sampling_batch(cfg, model_fn)
    n = int(cfg.n_compare)
    what = f"samples of {cfg.ckpt or 'the FP model'}"
    cond, cond_info = conditioning_for(cfg, model, n, int(cfg.seed))
    with timed(timings, "sampling_s"), frozen_weights(model.unet):
        x = sample_sharded(sampler, checked_model_fn(model_fn, what), n, image_shape(model), cfg.seed,
                           batch, fabric, cond=cond)
    require_finite(x, what, "the weights or the checkpoint's ranges are broken")
    imgs = to_uint8(to_images(model, x))
    if fabric is not None and fabric.global_rank != 0:
        return {"task": "sample", "rank": fabric.global_rank}
    save_rows_png([imgs[: cfg.n_grid]], out / "samples.png")
    write_npz(out / "samples.npz", arr_0=imgs.permute(0, 2, 3, 1).numpy())
    results = {
        "task": "sample",
        "model": cfg.model.name,
        "ckpt": cfg.ckpt,
        "quantizer": meta.get("quantizer"),
        "bits": meta.get("bits"),
        "backend": cfg.get("backend", "torch"),
        "seed": int(cfg.seed),
        "n": n,
        "devices": 1 if fabric is None else fabric.world_size,
        "sampler": sampler.describe(),
        "conditioning": cond_info,  # each sample's class or prompt
        "timings": timings,
        "complete": True,
    }
    if hasattr(model_fn, "stats"):  # the runtime: how many models it compiled, and the time that took
        results["openvino"] = dict(model_fn.stats, sampling_batch=batch, call_batch=model_fn.call_batch or batch,
                                   step_tables=model_fn.manifest.get("step_tables"))
    write_json(out / "results.json", results)
    log.info("wrote %d samples to %s", n, out / "samples.npz")
    return results

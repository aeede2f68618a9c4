"""task=quantize (the default): calibrate, quantize, sample FP vs quantized, evaluate, save."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tfmq_exp.diffusion.sampling import to_uint8, unet_fn
from tfmq_exp.eval.similarity import similarity_metrics
from tfmq_exp.export.size_report import deploy_report
from tfmq_exp.methods import MethodContext, build_recipe, get_method
from tfmq_exp.models.attention import attention_settings
from tfmq_exp.models.loader import load_model
from tfmq_exp.quant.frozen import frozen_weights
from tfmq_exp.quant.state import save_quantized
from tfmq_exp.quant.summary import quant_summary
from tfmq_exp.results import config_signature, save_rows_png, write_json, write_npz
from tfmq_exp.tasks.common import (
    bits_label,
    build_sampler,
    calib_record,
    checked_model_fn,
    image_shape,
    seed_everything,
    set_stage,
    timed,
)
from tfmq_exp.tasks.conditioning import conditioning_for, to_images
from tfmq_exp.tasks.evaluate import active, class_metrics, evaluate_samples, samples_needed, temporal_diagnostics
from tfmq_exp.tasks.resume_run import finished_results, unit_checkpoint
from tfmq_exp.tracking import make_tracker

log = logging.getLogger("tfmq_exp")


def run_quantize(cfg: DictConfig, out: Path) -> dict[str, Any]:
    timings: dict[str, float] = {}
    seed_everything(cfg.seed)
    method = get_method(cfg.quantizer.name)
    build_recipe(cfg.quantizer)  # fail fast on impossible bit widths, before any work
    unit_ckpt = unit_checkpoint(cfg)  # resume= (tasks/resume_run.py): per-unit progress of this configuration
    previous = finished_results(unit_ckpt)
    if previous is not None:  # a requeued or repeated job whose configuration already finished
        write_json(out / "already_complete.json", {"results": str(unit_ckpt.completed["results"])})
        return previous
    model = load_model(cfg.model)
    sampler = build_sampler(cfg, model)
    run_id = None if unit_ckpt is None else f"tfmq-{config_signature(cfg)}"  # the same W&B run when resumed
    tracker = make_tracker(cfg.logger, OmegaConf.to_container(cfg, resolve=True), out, run_id)
    record, cache_hit = None, None
    if cfg.quantizer.name != "fp":
        with timed(timings, "calib_data_s"):
            model.unet.to(sampler.device)
            record, cache_hit = calib_record(cfg, model, sampler)
            model.unet.cpu()
    ctx = MethodContext(
        fp_unet=model.unet,
        record=record,
        quantizer=cfg.quantizer,
        calib=cfg.calib,
        recon=cfg.recon,
        trainer=cfg.trainer,
        seed=int(cfg.seed),
        family=cfg.model.family,
        origin=str(cfg.model.get("origin", "ddim")),
        checkpoint=unit_ckpt,
    )
    with timed(timings, "quantization_s"):
        res = method(ctx)
    timings.update({k: round(v, 3) for k, v in res.timings.items()})
    bits = bits_label(res.recipe)
    if res.recipe is not None:
        log.info("quantized layers:\n%s", quant_summary(res.model))
    ckpt = save_checkpoint(cfg, res, bits, sampler, out)  # now, so a later failure or interrupt keeps it
    n_fp = max(int(cfg.n_compare), int(cfg.n_grid))
    n_q = max(n_fp, samples_needed(cfg))
    bs = int(cfg.sampler.batch_size)
    shape = image_shape(model)
    model.unet.to(sampler.device)
    res.model.to(sampler.device)
    cond, cond_info = conditioning_for(cfg, model, n_q, int(cfg.seed))
    with timed(timings, "sampling_s"):
        fp_fn = checked_model_fn(unet_fn(model.unet), "FP samples")
        fp_img = to_uint8(to_images(model, finite(sampler.sample(
            fp_fn, n_fp if res.recipe else n_q, shape, cfg.seed, bs, desc="FP samples", cond=cond), "FP samples")))
        q_name = f"{cfg.quantizer.name} {bits} samples"
        with frozen_weights(res.model):  # every rounding is final: the weights are quantized once
            q_img = fp_img if res.recipe is None else to_uint8(to_images(model, finite(
                sampler.sample(checked_model_fn(unet_fn(res.model), q_name), n_q, shape, cfg.seed, bs,
                               desc=f"{cfg.quantizer.name} samples", cond=cond), q_name)))
    save_rows_png([fp_img[: cfg.n_grid], q_img[: cfg.n_grid]], out / "samples.png")
    write_npz(out / "samples.npz", arr_0=q_img.permute(0, 2, 3, 1).numpy())  # ADM layout: uint8 NHWC
    n_cmp = int(cfg.n_compare)
    metrics: dict[str, Any] = {f"fp_{k}": v for k, v in similarity_metrics(q_img[:n_cmp], fp_img[:n_cmp]).items()}
    with timed(timings, "evaluation_s"):
        metrics.update(evaluate_samples(cfg, q_img, out, prompts=cond_info.get("prompts")))
        metrics.update(class_metrics(cfg, q_img, cond_info))
        if res.recipe is not None and active(cfg) and cfg.evaluator.get("diagnostics", False):
            temporal = temporal_diagnostics(model.unet, res.model, sampler.timesteps, out)
            metrics["temporal_cosine_mean"] = temporal["mean_cosine"]
            metrics["temporal_rel_l2_mean"] = temporal["mean_rel_l2"]
            metrics["temporal_fraction_shifted"] = temporal["fraction_shifted"]
            res.info["temporal_error"] = temporal
    model.unet.cpu()
    res.model.cpu()
    objective = metrics.get("fid", metrics["fp_mse"])
    results = {
        "task": "quantize",
        "model": cfg.model.name,
        "quantizer": cfg.quantizer.name,
        "bits": bits,
        "seed": int(cfg.seed),
        "config_signature": config_signature(cfg),
        "sampler": sampler.describe(),
        "calib_cache_hit": cache_hit,
        "calib_record": None if record is None else record.stats,  # mode, model_calls, wall_s of making it
        "timings": timings,
        "metrics": metrics,
        "objective": objective,
        "checkpoint": ckpt,
        "deploy": None if res.recipe is None else deploy_report(res.model, shape),  # sizes, BOPs (docs/deploy.md)
        "method_info": res.info,
        "conditioning": {k: v[: int(cfg.n_compare)] for k, v in cond_info.items()},  # first samples: class/prompt
        "complete": True,  # written last: a results.json without it comes from an older or broken run
    }
    write_json(out / "results.json", results)
    if unit_ckpt is not None:
        unit_ckpt.finish(out, out / "results.json")
    tracker.log_results(results, out, res.model if res.recipe is not None else None)  # docs/tracking.md
    tracker.finish()
    log.info(
        "%s %s: %s | timings %s",
        cfg.quantizer.name,
        bits,
        {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
        timings,
    )
    log.info("wrote %s", out / "results.json")
    return results


def finite(x: Any, what: str) -> Any:
    from tfmq_exp.checks import require_finite

    require_finite(x, what, "the model produced NaN/Inf; rerun with traceback=true to see where")
    return x


def save_checkpoint(cfg: DictConfig, res: Any, bits: str, sampler: Any, out: Path) -> str | None:
    """Write quantized.safetensors (atomically) with what a reload must match; None for the FP reference."""
    if res.recipe is None:
        return None
    set_stage("writing the checkpoint")
    meta = {
        "model": cfg.model.name,
        "quantizer": cfg.quantizer.name,
        "bits": bits,
        "seed": int(cfg.seed),
        "sampler": sampler.describe(),
        "timesteps": sampler.timesteps,
    }
    attn = attention_settings(res.model)
    if attn:
        meta["attention"] = attn
    path = save_quantized(res.model, res.recipe, out / "quantized.safetensors", meta)
    log.info("wrote %s", path)
    return str(path)

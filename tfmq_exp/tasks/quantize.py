"""task=quantize (the default): calibrate, quantize, sample FP vs quantized, evaluate, save."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from tfmq_exp.diffusion.sampling import to_uint8, unet_fn
from tfmq_exp.eval.similarity import similarity_metrics
from tfmq_exp.methods import MethodContext, build_recipe, get_method
from tfmq_exp.models.attention import attention_quantizers
from tfmq_exp.models.loader import load_model
from tfmq_exp.quant.state import save_quantized
from tfmq_exp.quant.summary import quant_summary
from tfmq_exp.results import config_signature, save_rows_png, write_json
from tfmq_exp.tasks.common import bits_label, build_sampler, calib_record, image_shape, seed_everything, timed
from tfmq_exp.tasks.evaluate import active, evaluate_samples, samples_needed, temporal_diagnostics
from tfmq_exp.tracking import make_tracker

log = logging.getLogger("tfmq_exp")


def run_quantize(cfg: DictConfig, out: Path) -> dict[str, Any]:
    timings: dict[str, float] = {}
    seed_everything(cfg.seed)
    method = get_method(cfg.quantizer.name)
    build_recipe(cfg.quantizer)  # fail fast on impossible bit widths, before any work
    model = load_model(cfg.model)
    sampler = build_sampler(cfg, model)
    tracker = make_tracker(cfg.logger, OmegaConf.to_container(cfg, resolve=True), out)
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
    )
    with timed(timings, "quantization_s"):
        res = method(ctx)
    timings.update({k: round(v, 3) for k, v in res.timings.items()})
    bits = bits_label(res.recipe)
    if res.recipe is not None:
        log.info("quantized layers:\n%s", quant_summary(res.model))
    n_fp = max(int(cfg.n_compare), int(cfg.n_grid))
    n_q = max(n_fp, samples_needed(cfg))
    bs = int(cfg.sampler.batch_size)
    shape = image_shape(model)
    model.unet.to(sampler.device)
    res.model.to(sampler.device)
    with timed(timings, "sampling_s"):
        fp_img = to_uint8(sampler.sample(unet_fn(model.unet), n_fp if res.recipe else n_q, shape, cfg.seed, bs,
                                         desc="FP samples"))
        q_img = fp_img if res.recipe is None else to_uint8(
            sampler.sample(unet_fn(res.model), n_q, shape, cfg.seed, bs, desc=f"{cfg.quantizer.name} samples")
        )
    save_rows_png([fp_img[: cfg.n_grid], q_img[: cfg.n_grid]], out / "samples.png")
    np.savez(out / "samples.npz", arr_0=q_img.permute(0, 2, 3, 1).numpy())  # ADM layout: uint8 NHWC
    n_cmp = int(cfg.n_compare)
    metrics: dict[str, Any] = {f"fp_{k}": v for k, v in similarity_metrics(q_img[:n_cmp], fp_img[:n_cmp]).items()}
    with timed(timings, "evaluation_s"):
        metrics.update(evaluate_samples(cfg, q_img, out))
        if res.recipe is not None and active(cfg) and cfg.evaluator.get("diagnostics", False):
            temporal = temporal_diagnostics(model.unet, res.model, sampler.timesteps, out)
            metrics["temporal_cosine_mean"] = temporal["mean_cosine"]
            metrics["temporal_rel_l2_mean"] = temporal["mean_rel_l2"]
            metrics["temporal_fraction_shifted"] = temporal["fraction_shifted"]
            res.info["temporal_error"] = temporal
    model.unet.cpu()
    res.model.cpu()
    ckpt = None
    if res.recipe is not None:
        meta = {
            "model": cfg.model.name,
            "quantizer": cfg.quantizer.name,
            "bits": bits,
            "seed": int(cfg.seed),
            "sampler": sampler.describe(),
            "timesteps": sampler.timesteps,
        }
        attn = attention_quantizers(res.model)
        if attn:
            any_q = next(q for n, q in attn.items() if n.endswith("q_quantizer"))
            sm = next(q for n, q in attn.items() if n.endswith("softmax_quantizer"))
            meta["attention"] = {"act_bits": any_q.n_bits, "softmax_bits": sm.n_bits, "enabled": any_q.enabled}
        ckpt = str(save_quantized(res.model, res.recipe, out / "quantized.safetensors", meta))
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
        "timings": timings,
        "metrics": metrics,
        "objective": objective,
        "checkpoint": ckpt,
        "method_info": res.info,
    }
    write_json(out / "results.json", results)
    tracker.log({**metrics, **timings})
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

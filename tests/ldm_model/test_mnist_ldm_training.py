"""Both training stages run and are deterministic for a seed (tiny arch, a few steps); the latent scale is 1/std."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from tfmq_exp.models.mnist_ldm import build_parts
from tfmq_exp.models.train_ldm import latent_scale, posterior_stats, train_autoencoder, train_latent_unet


def tiny(ldm_cfg):
    cfg = OmegaConf.to_container(ldm_cfg, resolve=True)
    cfg["first_stage"]["arch"].update(block_out_channels=[8, 8, 8], norm_num_groups=4)
    cfg["arch"].update(block_out_channels=[16, 16], norm_num_groups=8, cross_attention_dim=16)
    cfg["class_embedder"]["embed_dim"] = 16
    cfg["first_stage"]["train"].update(steps=3, batch_size=8, warmup=1, log_every=3)
    cfg["train"].update(steps=3, batch_size=8, warmup=1, log_every=3)
    return OmegaConf.create(cfg)


def run(cfg, data, labels):
    torch.manual_seed(0)  # as run_train_ldm: the seed before the modules are built
    parts = build_parts(cfg)
    ae = train_autoencoder(parts["vae"], data, cfg.first_stage.train, seed=0)
    mean, std = posterior_stats(parts["vae"], data)
    scale = latent_scale(mean, std, seed=0)
    un, _ = train_latent_unet(parts["unet"], parts["class_embedder"], mean, std, labels, scale,
                              dict(cfg.scheduler), cfg.train, 0.5, seed=0)
    return parts, ae, un, scale


def test_two_stages_are_deterministic(ldm_cfg, digits):
    images, labels = digits
    data = torch.from_numpy(images[:32]).float().div(127.5).sub(1).unsqueeze(1)
    labels = torch.from_numpy(labels[:32])
    cfg = tiny(ldm_cfg)
    p1, ae, un, s1 = run(cfg, data, labels)
    p2, _, _, s2 = run(cfg, data, labels)
    assert s1 == s2 and ae["steps"] == 3 and un["steps"] == 3
    for name in p1:
        for (k, a), b in zip(p1[name].state_dict().items(), p2[name].state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k} differs between two runs with the same seed"
    # the scaled posterior samples have unit std by construction
    mean, std = posterior_stats(p1["vae"], data)
    z = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))) * s1
    assert abs(z.std().item() - 1.0) < 1e-4

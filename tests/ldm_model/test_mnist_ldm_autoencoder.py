"""The mnist_ldm autoencoder: 1x28x28 <-> 4x7x7 shapes, and the committed weights reconstruct real digits."""

from __future__ import annotations

import pytest
import torch

from tfmq_exp.data.mnist import load_mnist_tensor
from tfmq_exp.errors import UserError
from tfmq_exp.models.mnist_ldm import build_vae, decode, encode, load_mnist_ldm, save_mnist_ldm

PSNR_BOUND_DB = 24.0  # committed weights, posterior means of the first 64 digits (measured 26.1 dB)


def test_autoencoder_round_trips_shapes(ldm_cfg):
    torch.manual_seed(0)
    vae = build_vae(ldm_cfg.first_stage.arch).eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        assert dist.mean.shape == (3, 4, 7, 7)
        assert vae.decode(dist.mean).sample.shape == (3, 1, 28, 28)


def test_committed_weights_reconstruct_first_64_digits(ldm_cfg):
    _, vae, _, scale, sched = load_mnist_ldm(ldm_cfg)
    x = load_mnist_tensor()[:64]
    with torch.no_grad():
        recon = decode(vae, vae.encode(x).latent_dist.mean * scale, scale)
    mse = (recon - x).square().flatten(1).mean(1)  # range [-1, 1]: peak-to-peak 2
    psnr = (10 * torch.log10(4.0 / mse)).mean().item()
    assert psnr > PSNR_BOUND_DB, psnr
    assert 0.05 < scale < 20 and sched["beta_schedule"] == "scaled_linear"


def test_scaled_latents_have_unit_std(ldm_cfg):
    _, vae, _, scale, _ = load_mnist_ldm(ldm_cfg)
    z = encode(vae, load_mnist_tensor()[:500], scale, torch.Generator().manual_seed(1))
    assert z.shape == (500, 4, 7, 7)
    assert 0.85 < z.std().item() < 1.15  # the scale is 1/std over all 5,000 training latents


def test_weights_of_another_architecture_are_refused(ldm_cfg, tmp_path):
    from omegaconf import OmegaConf

    other = OmegaConf.to_container(ldm_cfg, resolve=True)
    other["first_stage"]["arch"]["block_out_channels"] = [16, 32, 48]
    from tfmq_exp.models.mnist_ldm import build_parts

    path = tmp_path / "other.safetensors"
    save_mnist_ldm(path, build_parts(OmegaConf.create(other)), 1.0, {})
    cfg = OmegaConf.merge(ldm_cfg, {"weights": str(path)})
    with pytest.raises(UserError, match=r"does not match model 'mnist_ldm' \(vae\)"):
        load_mnist_ldm(cfg)

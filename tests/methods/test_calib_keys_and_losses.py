"""Calibration cache keys follow the weights, not the path; reported losses cover every pool step."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import UNet2DModel
from omegaconf import OmegaConf

from tfmq_exp.diffusion.calib_data import CalibRecord, state_digest
from tfmq_exp.models.loader import load_model
from tfmq_exp.recon.engine import eval_indices
from tfmq_exp.tasks.common import model_identity

torch.set_num_threads(1)


def tiny() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def diffusers_cfg(path):
    return OmegaConf.create({"model": {"name": "tiny", "source": "diffusers", "pretrained": str(path),
                                       "subfolder": None, "unet_class": "UNet2DModel", "image_size": 8,
                                       "channels": 1, "scheduler": {"num_train_timesteps": 1000}}})


def test_diffusers_folder_is_keyed_by_its_weights(tmp_path):
    unet = tiny()
    unet.save_pretrained(tmp_path / "a")
    unet.save_pretrained(tmp_path / "b")
    keys = [model_identity(cfg, load_model(cfg.model)) for cfg in (diffusers_cfg(tmp_path / p) for p in "ab")]
    assert keys[0] == keys[1]  # the same weights under two paths: one key
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] += 1e-3
    unet.save_pretrained(tmp_path / "a")  # the folder's files change: a new key
    changed = model_identity(diffusers_cfg(tmp_path / "a"), load_model(diffusers_cfg(tmp_path / "a").model))
    assert changed != keys[0]
    assert changed["weights"] == state_digest(unet.eval())


def test_reported_losses_use_a_sample_spread_over_every_step():
    rec = CalibRecord(xs=torch.arange(5).float().view(5, 1, 1, 1, 1).repeat(1, 64, 1, 1, 1), ts=torch.arange(5))
    pool = rec.pool()  # step-major: 64 samples of step 0, then 64 of step 1, ...
    idx = eval_indices(len(pool), 40)
    steps = pool.step[idx]
    assert torch.bincount(steps).tolist() == [8, 8, 8, 8, 8]
    assert eval_indices(10, 256).tolist() == list(range(10))  # small pools: every sample


def test_weight_stage_reports_the_stratified_losses(monkeypatch):
    """loss_before/after are computed on eval_indices (every step), not on the first samples (step 0 only)."""
    from tfmq_exp.recon import engine

    seen = []
    real = engine.eval_indices
    monkeypatch.setattr(engine, "eval_indices", lambda n, k: seen.append(real(n, k)) or seen[-1])
    q = SimpleNamespace(rounding="nearest", alpha=torch.nn.Parameter(torch.zeros(1)))
    q.regularizer = lambda beta: q.alpha.sum() * 0
    loss = engine.optimize_rounding([q], lambda idx: (q.alpha * 0).sum() + idx.float().mean(), 300,
                                    engine.ReconSettings(iters=2, eval_samples=30), engine.FabricRunner(), seed=0)
    assert len(seen) == 2 and seen[0].tolist() == list(range(0, 300, 10))
    assert loss["loss_before"] == loss["loss_after"] == float(torch.arange(0, 300, 10).float().mean())


def test_a_nan_alpha_stops_the_unit_instead_of_rounding_down():
    """NaN >= 0 is false, so a NaN alpha would silently become 'round down': the engine refuses it."""
    import pytest

    from tfmq_exp.checks import NonFiniteError
    from tfmq_exp.recon import engine

    q = SimpleNamespace(rounding="nearest", alpha=torch.nn.Parameter(torch.zeros(3)))
    q.regularizer = lambda beta: q.alpha.sum() * 0

    def loss(idx):  # finite before, then the gradient blows alpha up to NaN
        return (q.alpha * float("nan")).sum() if q.rounding == "soft" else idx.float().mean()

    with pytest.raises(NonFiniteError, match="AdaRound parameters of unit7 is not finite"):
        engine.optimize_rounding([q], loss, 10, engine.ReconSettings(iters=2, eval_samples=4), engine.FabricRunner(),
                                 seed=0, desc="unit7")

"""Per-step bookkeeping follows the schedule the sampler really runs (docs/methods.md §9 T4).

LDM's uniform DDIM takes every T // S-th step: asking for 400 of 1000 runs 500 (LSUN-Churches in the
official code). ``sampler.uniform_steps=stride`` runs exactly those steps, and the calibration record, TIAR's
finite set of time steps and FSC's per-step tables all cover the 500 steps run, not the 400 asked for.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_unets import tiny_unet

from tfmq_exp.config import register_configs
from tfmq_exp.diffusion.calib_data import collect
from tfmq_exp.diffusion.sampling import Sampler, ddim_timesteps, unet_fn
from tfmq_exp.errors import UserError
from tfmq_exp.methods import MethodContext, get_method
from tfmq_exp.quant.quantizer import StepNotCalibratedError
from tfmq_exp.quant.swap import activation_quantizers

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[2] / "conf"
SCHED = {"num_train_timesteps": 10, "beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.2}


def test_churches_400_steps_run_500_with_the_ldm_offset():
    ts = ddim_timesteps(1000, 400, "uniform", offset=1, uniform_steps="stride")
    assert len(ts) == 500
    assert ts == [2 * (499 - k) + 1 for k in range(500)]  # the real steps, not (400 - k) * 1000 // 400 + 1
    with pytest.raises(UserError, match="400 would run 500 steps.*sampler.uniform_steps=stride"):
        ddim_timesteps(1000, 400, "uniform", offset=1)
    assert ddim_timesteps(1000, 200, "uniform", 1, "stride") == ddim_timesteps(1000, 200, "uniform", 1)
    with pytest.raises(UserError, match="unknown sampler.uniform_steps 'loose'"):
        ddim_timesteps(1000, 400, "uniform", uniform_steps="loose")


def test_the_config_exposes_the_switch():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sampler.steps=400", "sampler.uniform_steps=stride"])
    assert cfg.sampler.uniform_steps == "stride"


def test_tables_and_tiar_cover_the_steps_actually_run():
    # T = 10, 4 steps asked: stride 2 runs 5 steps, t = 9, 7, 5, 3, 1 with the LDM offset
    sampler = Sampler(SCHED, steps=4, eta=0.0, clip_x0=False, timestep_offset=1, final_alpha_one=False,
                      uniform_steps="stride")
    assert sampler.timesteps == [9, 7, 5, 3, 1] and sampler.num_steps == 5
    fp = tiny_unet()
    rec = collect(unet_fn(fp), sampler, n=8, image_shape=(1, 8, 8), seed=0, batch_size=8)
    assert rec.ts.tolist() == [9, 7, 5, 3, 1] and rec.xs.shape[0] == 5
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["quantizer=tfmq", "bits=w4a8", "recon=smoke",
                                                       "quantizer.options.fsc_per_step=8", "recon.pool_size=40"])
    ctx = MethodContext(fp_unet=fp, record=rec, quantizer=cfg.quantizer, calib=cfg.calib, recon=cfg.recon,
                        trainer=cfg.trainer, seed=0)
    res = get_method("tfmq")(ctx)
    tables = [q for q in activation_quantizers(res.model) if q.enabled and q.has_step_tables]
    assert tables and all(q.step_scale.shape == (5,) for q in tables)
    assert res.info["fsc_steps"] == 5
    tiar = res.info["units"][0]
    assert tiar["kind"] == "tib" and tiar["timesteps"] == [1, 3, 5, 7, 9]
    x = sampler.sample(unet_fn(res.model), 2, (1, 8, 8), seed=5, batch_size=2)
    assert torch.isfinite(x).all()
    # a schedule with more steps than were calibrated stops at the first step without a table
    longer = Sampler(SCHED, steps=10, eta=0.0, clip_x0=False)
    with pytest.raises(StepNotCalibratedError, match="sampling step 5 was never calibrated: the per-step tables "
                                                     "cover steps 0..4"):
        longer.sample(unet_fn(res.model), 2, (1, 8, 8), seed=5, batch_size=2)

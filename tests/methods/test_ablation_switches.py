"""The two TFMQ-DM ablations the paper reports: without TIAR, and without per-step tables (FSC scope none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_unets import tiny_unet

from tfmq_exp.config import register_configs
from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods import MethodContext, get_method
from tfmq_exp.models import adapters
from tfmq_exp.quant.swap import activation_quantizers

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[2] / "conf"


def run_tfmq(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["quantizer=tfmq", "bits=w4a8", "recon=smoke", *overrides])
    torch.manual_seed(1)
    rec = CalibRecord(xs=torch.randn(4, 16, 1, 8, 8), ts=torch.tensor([900, 600, 300, 50]))
    ctx = MethodContext(fp_unet=tiny_unet(), record=rec, quantizer=cfg.quantizer, calib=cfg.calib, recon=cfg.recon,
                        trainer=cfg.trainer, seed=0)
    return get_method("tfmq")(ctx)


def test_without_tiar_the_temporal_layers_are_reconstructed_like_the_baselines():
    res = run_tfmq("++quantizer.options.tiar=false")
    units = [u["unit"] for u in res.info["units"]]
    assert res.info["tiar"] is False and "temporal_information_block" not in units
    assert units[0] == "time_embedding.linear_2"  # the time MLP first, as a single layer (linear_1 stays FP)
    mods = dict(res.model.named_modules())
    for name in adapters.temporal_layer_names(res.model):
        q = mods[name].weight_quantizer
        if name == "time_embedding.linear_1":
            assert q.alpha is None  # TFMQ-DM keeps it in full precision either way
        else:  # each time_emb_proj was rounded inside its block's reconstruction
            assert q.alpha is not None and q.rounding == "hard", name


def test_with_tiar_the_block_stage_leaves_the_temporal_layers_to_it():
    res = run_tfmq()
    assert res.info["tiar"] is True and res.info["units"][0]["unit"] == "temporal_information_block"


@pytest.mark.parametrize(("scope", "tables"), [("none", 0), ("all", None)])
def test_fsc_scope_none_gives_one_range_per_quantizer(scope, tables):
    res = run_tfmq(f"quantizer.options.fsc_scope={scope}")
    enabled = [q for q in activation_quantizers(res.model) if q.enabled]
    with_tables = [q for q in enabled if q.has_step_tables]
    if tables == 0:
        assert not with_tables and "fsc_steps" not in res.info
        assert all(q.scale.shape == () and q.scale > 0 for q in enabled)
    else:
        assert len(with_tables) == len(enabled) and res.info["fsc_steps"] == 4

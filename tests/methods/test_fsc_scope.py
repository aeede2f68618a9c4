"""TFMQ-DM with ``fsc_scope=tib`` end to end: per-step tables on the TIB inputs only (the paper's FSC).

Runs the registered ``tfmq`` method on a tiny UNet2DModel and a 4-step calibration record, with the
attention-matmul quantizers on as well, so every kind of activation quantizer is present.
"""

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
from tfmq_exp.quant.quantizer import StepNotCalibratedError
from tfmq_exp.quant.steps import step_context
from tfmq_exp.quant.swap import activation_quantizers

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[2] / "conf"
TS = torch.tensor([900, 600, 300, 50])




@pytest.fixture(scope="module")
def tib_run():
    """The real config (quantizer=tfmq, recon=smoke) with fsc_scope=tib and quant_attention=true."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "quantizer=tfmq", "bits=w4a8", "recon=smoke", "quantizer.options.fsc_scope=tib",
            "quantizer.options.quant_attention=true"])
    torch.manual_seed(1)
    xs = torch.randn(4, 16, 1, 8, 8) * torch.tensor([1.0, 0.8, 0.5, 0.3]).view(-1, 1, 1, 1, 1)
    rec = CalibRecord(xs=xs, ts=TS)
    ctx = MethodContext(fp_unet=tiny_unet(), record=rec, quantizer=cfg.quantizer, calib=cfg.calib, recon=cfg.recon,
                        trainer=cfg.trainer, seed=0)
    return get_method("tfmq")(ctx), rec


def _tib_input_quantizers(model) -> dict:
    mods = dict(model.named_modules())
    return {n: mods[n].input_quantizer for n in adapters.temporal_layer_names(model)
            if mods[n].input_quantizer.enabled}


def test_only_the_tib_inputs_have_per_step_tables(tib_run):
    res, rec = tib_run
    model = res.model
    tib = _tib_input_quantizers(model)
    # linear_1 and linear_2 take FP inputs under TFMQ's rules: the tables sit on the 8 time_emb_proj inputs
    assert sorted(tib) == sorted(f"{n}.time_emb_proj" for n, _ in adapters.resnet_blocks(model))
    assert res.info["fsc_scope"] == "tib" and res.info["fsc_quantizers"] == 8 and res.info["fsc_steps"] == 4
    for name, q in tib.items():
        assert q.step_scale.shape == (4,) and q.step_zero_point.shape == (4,), name
    others = [q for q in activation_quantizers(model) if q.enabled and all(q is not t for t in tib.values())]
    attention = list(adapters.attention_quantizers(model).values())
    assert len(attention) == 4 * 4 and all(q.enabled for q in attention)  # 4 attentions x (q, k, v, softmax)
    assert len(others) > 20
    for q in others + attention:
        assert q.step_scale.numel() == 0 and q.scale.shape == () and q.zero_point.shape == ()


def test_tib_tables_are_each_steps_min_max(tib_run):
    """Every sample of step s has the same t, so the TIB input is one vector per step: its EMA range is that
    vector's range (0 forced in, 8 bits). The table must hold that range step by step, and differ per step."""
    res, rec = tib_run
    model = res.model
    tib = _tib_input_quantizers(model)
    raw: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: raw.__setitem__(n, a[0].detach()))
               for n in tib]
    try:
        for s in range(4):
            with torch.no_grad(), step_context(s):
                model(rec.xs[s, :2], TS[s].repeat(2))
            for name, q in tib.items():
                lo, hi = raw[name].min().clamp(max=0), raw[name].max().clamp(min=0)
                torch.testing.assert_close(q.step_scale[s], (hi - lo) / 255, rtol=1e-4, atol=0)
                assert q.step_zero_point[s] == torch.round(-lo / q.step_scale[s])
    finally:
        for h in handles:
            h.remove()
    for name, q in tib.items():
        assert torch.unique(q.step_scale).numel() == 4, (name, q.step_scale)


def test_the_model_reads_its_tables_by_step(tib_run):
    res, rec = tib_run
    x, t = rec.xs[1, :2], TS[1].repeat(2)
    with pytest.raises(StepNotCalibratedError, match="no sampling step is set"):
        res.model(x, t)
    with torch.no_grad():
        with step_context(1):
            right = res.model(x, t).sample
        with step_context(3):
            other = res.model(x, t).sample
    assert torch.isfinite(right).all() and not torch.equal(right, other)

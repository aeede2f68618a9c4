"""Q-Diffusion and BRECQ details as their official code: EMA without forcing 0, 'max' init, symmetric
activations, attention quantizers following the recipe, step selection, split shortcut per origin,
BRECQ's 8-bit head and stem, and the per-model recipes composed by Hydra."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tiny_unets import tiny_unet

from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods import MethodContext, get_method
from tfmq_exp.methods.reconstruction import pool_steps, weight_pool
from tfmq_exp.models.attention import QuantAttnProcessor, attention_settings
from tfmq_exp.quant.modules import QuantMixin, quant_modules
from tfmq_exp.quant.quantizer import UniformQuantizer

torch.set_num_threads(1)


# -- quantizer rules --------------------------------------------------------------------------------


def observe(q: UniformQuantizer, *batches: torch.Tensor) -> None:
    q.observing = True
    q(batches[0])
    q.running_stat = True
    for b in batches[1:]:
        q(b)


def test_raw_ema_does_not_force_zero_into_the_range():
    a, b = torch.tensor([2.0, 2.5, 3.0]), torch.tensor([2.2, 4.0])
    raw, forced = UniformQuantizer(8, init="minmax", ema="raw"), UniformQuantizer(8, init="minmax")
    observe(raw, a, b)
    observe(forced, a, b)
    m, M = 0.95 * 2.0 + 0.05 * 2.2, 0.95 * 3.0 + 0.05 * 4.0
    assert torch.allclose(raw.scale, torch.tensor((M - m) / 255)) and raw.zero_point == round(-m / ((M - m) / 255))
    assert torch.allclose(forced.scale, torch.tensor(M / 255)) and forced.zero_point == 0
    # the raw grid spans [m, M]: 2.0 is not clipped up to m, and 3.0 maps inside
    x = torch.tensor([m, M])
    assert torch.allclose(raw(x), x, atol=raw.scale.item())


def test_symmetric_activations():
    q = UniformQuantizer(8, init="max", symmetric=True, ema="raw")
    observe(q, torch.tensor([-1.0, 3.0]), torch.tensor([-5.0, 1.0]))
    m, M = 0.95 * -1 + 0.05 * -5, 0.95 * 3 + 0.05 * 1
    assert (q.qmin, q.qmax) == (-128, 127)
    assert torch.allclose(q.scale, torch.tensor(max(abs(m), abs(M)) / 127)) and q.zero_point == 0


def test_qdiff_max_init_hand_values():
    q = UniformQuantizer(8, init="max")
    q.init_range(torch.tensor([-1.0, 3.0]))
    assert torch.allclose(q.scale, torch.tensor(4 / 255)) and q.zero_point == 64  # round(1 / (4/255)) = 64
    pos = UniformQuantizer(8, init="max")
    pos.init_range(torch.tensor([1.0, 3.0]))  # raw span 2, zero point from min(x_min, 0) = 0: QD clips at 2
    assert torch.allclose(pos.scale, torch.tensor(2 / 255)) and pos.zero_point == 0
    w = UniformQuantizer(4, per_channel=True, init="max")
    w.init_range(torch.tensor([[-1.0, 0.5], [0.2, 0.8]]))
    assert torch.allclose(w.scale.flatten(), torch.tensor([1.5 / 15, 0.6 / 15]))
    assert w.zero_point.flatten().tolist() == [10.0, 0.0]


def test_lp_search_on_one_signed_data_does_not_force_zero():
    from tfmq_exp.quant.functional import lp_search_params

    x = torch.linspace(2.0, 3.0, 101)
    scale, zp = lp_search_params(x, 8)
    lo = -zp * scale  # the grid's lower end
    assert lo > 1.5 and torch.allclose(scale, torch.tensor(1.0 / 255), rtol=0.05)


# -- step selection ---------------------------------------------------------------------------------


def test_step_selection_is_range_0_n_n_over_cali_st():
    assert pool_steps(50, 16) == list(range(0, 50, 3)) and len(pool_steps(50, 16)) == 17
    assert pool_steps(100, 20) == list(range(0, 100, 5))
    assert pool_steps(10, 16) == list(range(10))
    rec = CalibRecord(xs=torch.randn(50, 8, 1, 2, 2), ts=torch.arange(50).flip(0))
    ctx = SimpleCtx(rec, {"calib_steps": 16}, pool_size=64)
    pool = weight_pool(ctx)
    assert sorted(set(pool.step.tolist())) == list(range(0, 50, 3))
    assert len(pool) == 17 * 4  # cali_n = pool_size // cali_st = 4 samples of each selected step


class SimpleCtx:
    def __init__(self, rec, options, pool_size):
        self.record = rec
        self.quantizer = OmegaConf.create({"options": options})
        self.recon = OmegaConf.create({"pool_size": pool_size})


# -- whole methods on a tiny UNet -------------------------------------------------------------------




def run_method(name: str, origin: str, options: dict | None = None, act: dict | None = None, bits=(4, 8)):
    rec = CalibRecord(xs=torch.randn(4, 16, 1, 8, 8), ts=torch.tensor([750, 500, 250, 0]))
    quantizer = OmegaConf.create({
        "name": name, "weight": {"n_bits": bits[0], "per_channel": True, "init": "lp", "p": 2.4, "symmetric": False},
        "act": {"n_bits": bits[1], "per_channel": False, "init": "lp", "p": 2.4, "symmetric": False,
                "ema": "raw", **(act or {})},
        "act_calib_samples": 8, "rules": [], "options": {"calib_steps": 4, "fsc_per_step": 16, **(options or {})},
    })
    ctx = MethodContext(
        fp_unet=tiny_unet(), record=rec, quantizer=quantizer, calib=OmegaConf.create({"batch_size": 8}),
        recon=OmegaConf.create({"iters": 4, "batch_size": 4, "pool_size": 16, "act_iters": 2, "act_lr": 4e-4,
                                "weight_lr": 1e-3, "reg_weight": 0.01, "warmup": 0.2, "beta_start": 20.0,
                                "beta_end": 2.0, "cache_on": "device"}),
        trainer=OmegaConf.create({"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true",
                                  "num_nodes": 1}),
        seed=0, origin=origin,
    )
    return get_method(name)(ctx)


@pytest.mark.parametrize(("origin", "split"), [("ddim", True), ("sd", True), ("ldm", False)])
def test_split_shortcut_follows_the_origin(origin, split):
    res = run_method("qdiff", origin)
    splits = [n for n, m in quant_modules(res.model) if m.split]
    assert bool(splits) == split
    if split:
        assert splits == ["up_blocks.0.resnets.0.conv_shortcut", "up_blocks.0.resnets.1.conv_shortcut",
                          "up_blocks.1.resnets.0.conv_shortcut", "up_blocks.1.resnets.1.conv_shortcut"]


@pytest.mark.parametrize(("origin", "always_zero", "softmax_symmetric"), [("ddim", False, True), ("ldm", True, False)])
def test_attention_quantizers_follow_the_recipe(origin, always_zero, softmax_symmetric):
    res = run_method("qdiff", origin, act={"init": "max", "symmetric": True})
    proc = next(m for m in res.model.modules() if isinstance(m, QuantAttnProcessor))
    assert proc.q_quantizer.init == "max" and proc.q_quantizer.symmetric and proc.q_quantizer.qmin == -128
    sm = proc.softmax_quantizer
    assert (sm.always_zero, sm.symmetric) == (always_zero, softmax_symmetric)
    assert attention_settings(res.model)["softmax_always_zero"] == always_zero


@pytest.mark.parametrize(("origin", "wrapped"), [("ddim", True), ("ldm", False)])
def test_tfmq_attention_projections_follow_the_origin(origin, wrapped):
    res = run_method("tfmq", origin)
    mods = dict(res.model.named_modules())
    attn_layers = [n for n in mods if n.startswith("down_blocks.1.attentions.0.to_")]
    assert attn_layers, "the tiny UNet has an attention block"
    for n in attn_layers:
        if not n.endswith(("to_q", "to_k", "to_v")):
            continue
        assert isinstance(mods[n], QuantMixin) == wrapped
        if wrapped:  # reconstructed inside the attention block, inputs with per-step tables
            assert mods[n].weight_quantizer.alpha is not None
            assert mods[n].input_quantizer.step_scale.shape == (4,)
    units = [u["unit"] for u in res.info["units"]]
    assert ("down_blocks.1.attentions.0" in units) == wrapped


def test_brecq_head_stem_keeps_the_first_layer_out_of_reconstruction():
    res = run_method("brecq", "ddim", options={"head_stem_8bit": True, "lsq": False})
    units = [u["unit"] for u in res.info["units"]]
    assert "conv_in" not in units and "conv_out" in units
    mods = dict(res.model.named_modules())
    assert mods["conv_in"].weight_quantizer.n_bits == 8 and mods["conv_in"].weight_quantizer.alpha is None
    assert mods["conv_out"].weight_quantizer.n_bits == 8 and mods["conv_out"].input_quantizer.n_bits == 8
    plain = run_method("brecq", "ddim", options={"lsq": False})
    assert "conv_in" in [u["unit"] for u in plain.info["units"]]


# -- per-model recipes through Hydra ----------------------------------------------------------------


def test_recipe_follows_model_and_method(make_cfg):
    cifar = make_cfg("model=ddpm_cifar10", "quantizer=qdiff").quantizer
    assert (cifar.weight.init, cifar.act.init, cifar.act.symmetric) == ("max", "max", True)
    assert cifar.options.calib_steps == 20 and cifar.options.split_shortcut is True
    assert make_cfg("model=ddpm_cifar10", "quantizer=tfmq").quantizer.act.init == "lp"  # no recipe for tfmq here
    assert make_cfg("model=mnist", "quantizer=qdiff").quantizer.act.symmetric is False
    # the user's override wins over the recipe; bits still come from bits=
    mine = make_cfg("model=ddpm_cifar10", "quantizer=qdiff", "quantizer.act.symmetric=false", "bits=w8a8").quantizer
    assert mine.act.symmetric is False and (mine.weight.n_bits, mine.act.n_bits) == (8, 8)
    preset = make_cfg("experiment=paper/cifar10_tfmq_w4a8", "quantizer=qdiff").quantizer
    assert preset.name == "qdiff" and preset.act.init == "max"

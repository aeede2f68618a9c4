"""TIAR (TFMQ-DM's time-information-aware reconstruction) on a tiny diffusers UNet2DModel.

What defines it: ``time_embedding.linear_1`` stays FP (no alpha, no regulariser term), the loss is
the sum over every temporal projection of its reconstruction error, and the block stage that follows
leaves the TIB's hard rounding exactly as TIAR left it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel
from tiny_unets import tiny_unet

from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods import pipeline
from tfmq_exp.models import adapters
from tfmq_exp.quant.recipe import QuantRecipe
from tfmq_exp.quant.swap import init_weight_ranges, swap_modules
from tfmq_exp.recon.engine import FabricRunner, ReconSettings

torch.set_num_threads(1)
T = torch.tensor([900, 600, 300, 50]).repeat_interleave(8)  # the pool's timesteps, 4 steps x 8 samples
SETTINGS = ReconSettings(iters=20, batch_size=8, eval_samples=32)




def tfmq_model() -> tuple[UNet2DModel, UNet2DModel, list[str]]:
    """FP model, W4A8 copy under TFMQ's FP rules (as the method builds it), the TIB layer names."""
    fp = tiny_unet()
    q = copy.deepcopy(fp)
    recipe = QuantRecipe().with_bits(4, 8)
    recipe.rules = adapters.fp_rules(fp, "tfmq", tfmq_attention_fp=False) + recipe.rules
    swap_modules(q, recipe)
    init_weight_ranges(q)
    return fp, q, adapters.temporal_layer_names(q)


@pytest.fixture
def spy_rounding(monkeypatch):
    """Record the quantizers and loss function every optimize_rounding call gets, then run it."""
    calls: list[dict] = []
    real = pipeline.optimize_rounding

    def spy(qs, loss_fn, n, s, runner, seed, desc="adaround"):
        calls.append({"qs": list(qs), "loss_fn": loss_fn, "n": n, "desc": desc})
        return real(qs, loss_fn, n, s, runner, seed, desc)

    monkeypatch.setattr(pipeline, "optimize_rounding", spy)
    return calls


def time_emb_proj_outputs(unet: UNet2DModel, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """E_i(t) of every resnet, taken with hooks from a full forward pass (not from tib_features)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        res.time_emb_proj.register_forward_hook(lambda _m, _a, out, n=name: seen.__setitem__(n, out.detach()))
        for name, res in adapters.resnet_blocks(unet)
    ]
    with torch.no_grad():
        unet(torch.zeros(t.shape[0], 1, 8, 8), t)
    for h in handles:
        h.remove()
    return seen


def test_linear_1_stays_fp_and_outside_the_regulariser(spy_rounding):
    fp, q, temporal = tfmq_model()
    pipeline.tiar_stage(q, fp, temporal, T, SETTINGS, FabricRunner(), 0, adapters.tib_features)
    mods = dict(q.named_modules())
    lin1 = mods["time_embedding.linear_1"]
    assert lin1.weight_quantizer.alpha is None and not lin1.weight_quantizer.enabled
    x = torch.randn(5, lin1.in_features)
    assert torch.equal(lin1(x), fp.time_embedding.linear_1(x))  # FP weights, FP input

    (call,) = spy_rounding
    expected = [mods[n].weight_quantizer for n in temporal if n != "time_embedding.linear_1"]
    assert len(expected) == 9  # linear_2 and the 8 resnets' time_emb_proj
    assert [id(qz) for qz in call["qs"]] == [id(qz) for qz in expected]  # exactly the regulariser's terms
    assert all(qz.alpha is not None and qz.rounding == "hard" for qz in expected)
    beta = 7.0
    reg = sum(qz.regularizer(beta) for qz in call["qs"])
    by_hand = sum(
        (1 - (2 * torch.clamp(torch.sigmoid(qz.alpha) * 1.2 - 0.1, 0, 1) - 1).abs().pow(beta)).sum() for qz in expected
    )
    torch.testing.assert_close(reg, by_hand, rtol=1e-6, atol=0)


def test_tiar_loss_is_the_sum_over_every_temporal_projection(spy_rounding):
    fp, q, temporal = tfmq_model()
    pipeline.tiar_stage(q, fp, temporal, T, SETTINGS, FabricRunner(), 0, adapters.tib_features)
    (call,) = spy_rounding
    assert call["n"] == T.shape[0]
    idx = torch.tensor([0, 3, 9, 17, 30])
    loss = call["loss_fn"](idx).detach()

    e_q, e_fp = time_emb_proj_outputs(q, T[idx]), time_emb_proj_outputs(fp, T[idx])
    assert len(e_fp) == 8
    terms = torch.stack([(e_q[n] - e_fp[n]).pow(2).sum(1).mean() for n in e_fp])  # lp_loss of each projection
    assert (terms > 0).all()  # every projection is quantized and contributes
    torch.testing.assert_close(loss, terms.sum(), rtol=1e-5, atol=0)
    assert not torch.isclose(loss, terms.mean(), rtol=0.5)  # a sum, not a mean over projections


def test_block_stage_leaves_the_tib_rounding_untouched(spy_rounding):
    fp, q, temporal = tfmq_model()
    pipeline.tiar_stage(q, fp, temporal, T, SETTINGS, FabricRunner(), 0, adapters.tib_features)
    mods = dict(q.named_modules())
    tib = {n: mods[n].weight_quantizer for n in temporal if n != "time_embedding.linear_1"}
    # Give the TIB a rounding far from round-to-nearest, so a re-initialised alpha would show in the codes.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for qz in tib.values():
            qz.alpha.copy_(torch.where(torch.rand(qz.alpha.shape, generator=g) < 0.5, -3.0, 3.0))
    alpha = {n: qz.alpha.detach().clone() for n, qz in tib.items()}
    codes = {n: qz.integer_codes(mods[n].weight) for n, qz in tib.items()}
    nearest = {n: torch.clamp(torch.round(mods[n].weight / qz.scale) + qz.zero_point, qz.qmin, qz.qmax).int()
               for n, qz in tib.items()}
    assert all(not torch.equal(codes[n], nearest[n]) for n in tib)

    torch.manual_seed(2)
    xs = torch.randn(4, 8, 1, 8, 8)
    pool = CalibRecord(xs=xs, ts=torch.tensor([900, 600, 300, 50])).pool()
    units = [adapters.Unit(u.name, mods[u.name], u.kind) for u in adapters.reconstruction_units(fp, order="forward")]
    pipeline.weight_stage(q, fp, units, pool, SETTINGS, FabricRunner(), 0, exclude=set(temporal))

    for n, qz in tib.items():
        assert qz.rounding == "hard", n
        assert torch.equal(qz.alpha, alpha[n]), n
        assert torch.equal(qz.integer_codes(mods[n].weight), codes[n]), n
    optimised = {id(qz) for call in spy_rounding[1:] for qz in call["qs"]}
    assert not optimised & {id(qz) for qz in tib.values()}
    # the blocks around them were reconstructed: their other layers got alpha
    for name, res in adapters.resnet_blocks(q):
        assert res.conv2.weight_quantizer.alpha is not None, name
    assert mods["time_embedding.linear_1"].weight_quantizer.alpha is None

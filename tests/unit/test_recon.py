"""Reconstruction engine: AdaRound beats round-to-nearest, LSQ moves step sizes, FSC tables per step."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods.pipeline import fsc_stage, init_activations, lsq_stage, weight_stage
from tfmq_exp.quant import QuantRecipe, step_context
from tfmq_exp.quant.recipe import parse_bits
from tfmq_exp.quant.swap import activation_quantizers, init_weight_ranges, swap_modules
from tfmq_exp.recon.engine import FabricRunner, ReconSettings, lp_loss


class Net(nn.Module):
    """A model with the (x, t) call signature of a denoiser and one two-conv block."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x, t):
        return self.block(x) * (1 + t.view(-1, 1, 1, 1).float() / 1000)


def _setup(bits="w4a8", n_steps=3, n=64):
    torch.manual_seed(0)
    fp = Net().eval()
    q = copy.deepcopy(fp)
    swap_modules(q, QuantRecipe().with_bits(*parse_bits(bits)))
    init_weight_ranges(q)
    xs = torch.randn(n_steps, n, 2, 6, 6) * torch.tensor([0.2, 1.0, 5.0])[:n_steps].view(-1, 1, 1, 1, 1)
    rec = CalibRecord(xs=xs, ts=torch.tensor([900, 500, 100])[:n_steps])
    return fp, q, rec


def test_lp_loss_hand_value():
    pred, tgt = torch.zeros(2, 3, 1), torch.ones(2, 3, 1)
    assert lp_loss(pred, tgt).item() == 3.0  # sum over dim 1 (3 channels), mean over the rest


def test_adaround_lowers_block_loss_below_rtn():
    fp, q, rec = _setup()
    pool = rec.pool(1)
    unit = SimpleNamespace(name="block", module=q.block, kind="block")
    s = ReconSettings(iters=1000, batch_size=32, eval_samples=192)
    rep = weight_stage(q, fp, [unit], pool, s, FabricRunner(), seed=0)[0]
    assert rep["loss_after"] < 0.8 * rep["loss_before"], rep
    assert all(m.weight_quantizer.rounding == "hard" for m in q.block if hasattr(m, "weight_quantizer"))


def test_lsq_updates_activation_steps():
    fp, q, rec = _setup()
    pool = rec.pool(1)
    init_activations(q, pool, 16, seed=0, running_stat=False, batch_size=16)
    before = [aq.scale.clone() for aq in activation_quantizers(q)]
    unit = SimpleNamespace(name="block", module=q.block, kind="block")
    rep = lsq_stage(q, fp, [unit], pool, ReconSettings(act_iters=50, batch_size=16), FabricRunner(), seed=0)[0]
    after = list(activation_quantizers(q))
    assert rep["stage"] == "act" and rep["iters"] == 50
    assert any(not torch.equal(b, a.scale) for b, a in zip(before, after))
    assert all(isinstance(a.scale, torch.Tensor) and not isinstance(a.scale, nn.Parameter) for a in after)


def test_fsc_tables_follow_each_steps_range():
    fp, q, rec = _setup()
    by_step = {k: rec.pool(steps=[k]) for k in range(3)}
    qs = list(activation_quantizers(q))
    fsc_stage(q, by_step, 3, qs, init_samples=16, batch_size=16, momentum=0.95, seed=0)
    first = q.block[0].input_quantizer
    assert first.step_scale.shape[0] == 3
    assert first.step_scale[0] < first.step_scale[1] < first.step_scale[2]  # inputs scaled 0.2, 1, 5
    x = rec.xs[2, :4]
    t = torch.full((4,), 100)
    with step_context(2):
        out_right = q(x, t)
    with step_context(0):
        out_wrong = q(x, t)  # step 0's narrow range clips step 2's inputs
    ref = fp(x, t)
    assert (out_right - ref).abs().mean() < (out_wrong - ref).abs().mean()


def test_host_and_device_caches_give_the_same_rounding():
    results = []
    for cache_on in ("device", "host"):
        fp, q, rec = _setup()
        unit = SimpleNamespace(name="block", module=q.block, kind="block")
        s = ReconSettings(iters=50, batch_size=16)
        rep = weight_stage(q, fp, [unit], rec.pool(1), s, FabricRunner(), seed=0, cache_on=cache_on)[0]
        results.append((rep["loss_after"], [m.weight_quantizer.alpha.detach().clone() for m in q.block[::2]]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_unknown_cache_placement_is_an_error():
    fp, q, rec = _setup()
    unit = SimpleNamespace(name="block", module=q.block, kind="block")
    with pytest.raises(ValueError, match="cache_on"):
        weight_stage(q, fp, [unit], rec.pool(1), ReconSettings(iters=1), FabricRunner(), seed=0, cache_on="gpu0")

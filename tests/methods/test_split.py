"""Q-Diffusion's split shortcut under AdaRound: both weight halves are learned and regularised, and the
exported checkpoint (integer codes of both halves) reloads to bit-identical outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods import pipeline
from tfmq_exp.models.adapters import Unit
from tfmq_exp.quant.recipe import QuantRecipe
from tfmq_exp.quant.state import load_quantized, save_quantized
from tfmq_exp.quant.swap import init_weight_ranges, set_quant_state, swap_modules
from tfmq_exp.recon.engine import FabricRunner, ReconSettings

torch.set_num_threads(1)
SPLIT = 6  # the shortcut sees [h (6 channels), skip (4 channels, 10x larger)], as an up-block resnet does


class SkipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(4, SPLIT, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(SPLIT + 4, 4, 1))  # the "conv_shortcut" on the concatenation

    def forward(self, x, t):
        h = self.pre(x) * (1 + t.view(-1, 1, 1, 1).float() / 1000)
        return self.block(torch.cat([h, 10 * x], 1))


def setup():
    torch.manual_seed(0)
    fp = SkipNet().eval()
    q = copy.deepcopy(fp)
    recipe = QuantRecipe().with_bits(4, 8)
    swap_modules(q, recipe, {"block.0": SPLIT})
    init_weight_ranges(q)
    pool = CalibRecord(xs=torch.randn(2, 32, 4, 5, 5), ts=torch.tensor([700, 100])).pool()
    return fp, q, recipe, pool


def _hand_regulariser(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    h = torch.clamp(torch.sigmoid(alpha) * 1.2 - 0.1, 0, 1)
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = pipeline.optimize_rounding

    def wrapped(qs, *args, **kwargs):
        calls.append(list(qs))
        return real(qs, *args, **kwargs)

    monkeypatch.setattr(pipeline, "optimize_rounding", wrapped)
    return calls


def test_both_halves_get_alpha_and_enter_the_regulariser(spy):
    fp, q, _, pool = setup()
    conv = q.block[0]
    wq, wq_split = conv.weight_quantizer, conv.weight_quantizer_split
    # strong regulariser from the first iteration: every alpha it sees is driven to a hard 0/1
    s = ReconSettings(iters=200, batch_size=16, lr=0.05, reg_weight=1.0, warmup=0.0, eval_samples=64)
    pipeline.weight_stage(q, fp, [Unit("block", q.block, "block")], pool, s, FabricRunner(), 0)
    (qs,) = spy
    assert [id(x) for x in qs] == [id(wq), id(wq_split)]
    assert wq.alpha.shape == (4, SPLIT, 1, 1) and wq_split.alpha.shape == (4, 4, 1, 1)
    assert wq.rounding == wq_split.rounding == "hard"
    beta = 2.0
    torch.testing.assert_close(
        sum(x.regularizer(beta) for x in qs),
        _hand_regulariser(torch.cat([wq.alpha.flatten(), wq_split.alpha.flatten()]), beta), rtol=1e-6, atol=0)
    # both halves were regularised: their f_reg fell far below what the initial (fractional) alphas give
    for half, w in ((wq, conv.weight[:, :SPLIT]), (wq_split, conv.weight[:, SPLIT:])):
        r = w.detach() / half.scale - torch.floor(w.detach() / half.scale)
        init_alpha = -torch.log(1.2 / (r + 0.1) - 1)
        assert half.regularizer(beta) < 0.05 * _hand_regulariser(init_alpha, beta)
    # the halves have their own grids (the skip half is ten times wider)
    assert (wq_split.scale > 0).all() and not torch.equal(wq.scale, wq_split.scale)


def test_export_and_reload_are_bit_identical(spy, tmp_path):
    fp, q, recipe, pool = setup()
    conv = q.block[0]
    s = ReconSettings(iters=200, batch_size=16, lr=0.05, eval_samples=64)
    pipeline.weight_stage(q, fp, [Unit("block", q.block, "block")], pool, s, FabricRunner(), 0)
    pipeline.init_activations(q, pool, 32, seed=0, running_stat=False, batch_size=32)
    set_quant_state(q, weight=True, act=True)
    assert conv.input_quantizer_split.scale > 3 * conv.input_quantizer.scale  # split activation grids too
    with torch.no_grad():  # flip the first output channel's rounding of the split half: off nearest for sure
        conv.weight_quantizer_split.alpha[0] = torch.where(conv.weight_quantizer_split.alpha[0] >= 0, -3.0, 3.0)
    w = conv.weight.detach()
    hard = torch.cat([conv.weight_quantizer.integer_codes(w[:, :SPLIT]),
                      conv.weight_quantizer_split.integer_codes(w[:, SPLIT:])], 1)
    qz = conv.weight_quantizer_split
    nearest_split = torch.clamp(torch.round(w[:, SPLIT:] / qz.scale) + qz.zero_point, qz.qmin, qz.qmax).int()
    assert not torch.equal(hard[:, SPLIT:], nearest_split)  # so an export that ignored its alpha would show

    path = save_quantized(q, recipe, tmp_path / "split.safetensors")
    assert torch.equal(load_file(str(path))["block.0.weight_int"].int(), hard)
    reloaded, _, _ = load_quantized(copy.deepcopy(fp), path)
    assert reloaded.block[0].split == SPLIT
    x, t = pool.x[:8], pool.t[:8]
    with torch.no_grad():
        assert torch.equal(reloaded(x, t), q(x, t))
        set_quant_state(q, act=False)
        set_quant_state(reloaded, act=False)
        assert torch.equal(reloaded(x, t), q(x, t))

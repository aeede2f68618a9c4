"""FSC tables against a step-by-step reference of the official order on a two-layer net.

Official order per step: forget the ranges; one forward of the init batch in which every activation
quantizer takes its Lp-searched range and fake-quantizes (so the second layer initialises on quantized
inputs); then running statistics over shuffled mini-batches: raw extremes by EMA, (scale, z) = min-max with
0 inside, quantizing with the updated range as they go.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as tnf
from torch import nn

from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods.pipeline import fsc_stage
from tfmq_exp.quant import QuantizerSpec, QuantRecipe
from tfmq_exp.quant import functional as F
from tfmq_exp.quant.swap import activation_quantizers, init_weight_ranges, swap_modules

N_BITS = 4  # at 4 bits the Lp search clips, so the order of the first pass shows


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x, t):
        return self.conv2(tnf.silu(self.conv1(x)))


def build(init="lp"):
    torch.manual_seed(0)
    fp = TwoLayer().eval()
    q = copy.deepcopy(fp)
    recipe = QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=True), act=QuantizerSpec(n_bits=N_BITS, init=init))
    swap_modules(q, recipe)
    init_weight_ranges(q)
    # heavy tails (cubes of normals): the Lp search clips them, so the init pass's ranges differ from min-max
    xs = torch.randn(3, 48, 2, 5, 5) ** 3 * torch.tensor([0.3, 1.0, 3.0]).view(-1, 1, 1, 1, 1) + 0.2
    return q, CalibRecord(xs=xs, ts=torch.tensor([900, 500, 100]))


def reference_tables(q, rec, init_samples, batch_size, momentum, seed, first_rule):
    """The official procedure written out with the pure functions, layer by layer."""
    w1 = q.conv1.weight_quantizer(q.conv1.weight).detach()
    w2 = q.conv2.weight_quantizer(q.conv2.weight).detach()
    tables = [[], []]
    for s in range(rec.num_steps):
        pool = rec.pool(steps=[s])
        first = pool.shuffled(init_samples, seed * 7919 + s).x
        params, ext = [None, None], [None, None]

        def layer_input(j, a, ema, params=params, ext=ext):
            lo, hi = a.min(), a.max()
            if not ema:
                ext[j] = [lo, hi]
                if first_rule == "lp":
                    params[j] = F.lp_search_params(a, N_BITS)
                else:
                    params[j] = F.minmax_params(lo, hi, N_BITS)
            else:
                ext[j] = [F.ema(ext[j][0], lo, momentum), F.ema(ext[j][1], hi, momentum)]
                params[j] = F.minmax_params(ext[j][0], ext[j][1], N_BITS)
            return F.fake_quant(a, *params[j], *F.qrange(N_BITS))

        def forward(x, ema, layer_input=layer_input):
            h = tnf.conv2d(layer_input(0, x, ema), w1, q.conv1.bias, padding=1)
            return tnf.conv2d(layer_input(1, tnf.silu(h), ema), w2, q.conv2.bias, padding=1)

        forward(first, ema=False)
        for x, *_ in pool.shuffled(None, seed * 7919 + s + 1).batches(batch_size):
            forward(x, ema=True)
        for j in range(2):
            tables[j].append(params[j])
    return [(torch.stack([p[0] for p in t]), torch.stack([p[1] for p in t])) for t in tables]


@torch.no_grad()
def test_tables_equal_the_official_step_by_step_procedure():
    q, rec = build()
    qs = list(activation_quantizers(q))
    fsc_stage(q, {k: rec.pool(steps=[k]) for k in range(3)}, 3, qs, init_samples=16, batch_size=8, momentum=0.95,
              seed=0)
    ref = reference_tables(q, rec, 16, 8, 0.95, 0, first_rule="lp")
    for quantizer, (scales, zps) in zip(qs, ref):
        assert quantizer.step_scale.shape == (3,)
        assert torch.allclose(quantizer.step_scale, scales, rtol=1e-6, atol=0)
        assert torch.equal(quantizer.step_zero_point, zps)
    # the second layer's table depends on the order: a min-max first pass (the old shortcut) differs
    alt = reference_tables(q, rec, 16, 8, 0.95, 0, first_rule="minmax")
    assert not torch.allclose(alt[1][0], ref[1][0], rtol=1e-4, atol=0)
    assert torch.allclose(alt[0][0], ref[0][0], rtol=1e-6)  # the first layer sees raw inputs either way
    # wider inputs at later steps give wider tables for the first layer
    s = qs[0].step_scale
    assert s[0] < s[1] < s[2]

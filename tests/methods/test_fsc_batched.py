"""FSC with several steps per forward equals the one-step-at-a-time procedure (issue: FSC in one batched pass).

Each step's init pass and EMA are independent of the other steps', so the k-th mini-batch of every step can
share a forward if each quantizer keeps one range per step slice of the batch. The tables must be the same.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_fsc_official_order import build, reference_tables
from tiny_unets import tiny_unet

from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods.pipeline import fsc_stage
from tfmq_exp.models import adapters
from tfmq_exp.quant import QuantizerSpec, QuantRecipe
from tfmq_exp.quant.swap import activation_quantizers, init_weight_ranges, swap_modules

torch.set_num_threads(1)


def tables(q, rec, max_batch, batch_size=8):
    qs = list(activation_quantizers(q)) + list(adapters.attention_quantizers(q).values())
    fsc_stage(q, {k: rec.pool(steps=[k]) for k in range(rec.num_steps)}, rec.num_steps, qs, init_samples=16,
              batch_size=batch_size, momentum=0.95, seed=3, max_batch=max_batch)
    return [(x.step_scale.clone(), x.step_zero_point.clone()) for x in qs]


@torch.no_grad()
@pytest.mark.parametrize("max_batch", [16, 24, 1000])  # 2 steps per forward, 3 (the last chunk shorter), all
def test_batched_tables_equal_the_official_reference_on_a_two_layer_net(max_batch):
    q, rec = build()
    got = tables(q, rec, max_batch)
    ref = reference_tables(q, rec, 16, 8, 0.95, 3, first_rule="lp")
    for (s, z), (rs, rz) in zip(got, ref, strict=True):
        assert torch.allclose(s, rs, rtol=1e-6, atol=0) and torch.equal(z, rz)


@torch.no_grad()
def test_batched_tables_equal_step_by_step_on_a_unet_with_attention_quantizers():
    torch.manual_seed(0)
    fp = tiny_unet()
    q = copy.deepcopy(fp)
    swap_modules(q, QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=True), act=QuantizerSpec(n_bits=8)))
    init_weight_ranges(q)
    adapters.install_attention_quantizers(q, 8, 8, True)  # q/k/v/softmax: tensors of B * heads rows
    xs = torch.randn(4, 24, 1, 8, 8) * torch.tensor([1.0, 0.7, 0.4, 0.2]).view(-1, 1, 1, 1, 1)
    rec = CalibRecord(xs=xs, ts=torch.tensor([900, 600, 300, 50]))
    one = tables(copy.deepcopy(q), rec, max_batch=1)
    batched = tables(copy.deepcopy(q), rec, max_batch=1000)
    assert len(one) > 30
    # convolutions and matmuls of a larger batch round differently in the last bits (how, depends on the
    # CPU's kernels), and a last-bit change that moves one value across a rounding threshold moves it by a
    # whole 8-bit step, which the deeper layers see in their extremes: most entries agree exactly, and none
    # differs by more than a few 8-bit steps of its range (1/255 = 0.4 %; 0.35 % measured on an AVX-512 CPU,
    # under 0.1 % on another)
    rel = torch.cat([((s2 - s1).abs() / s1).flatten() for (s1, _), (s2, _) in zip(one, batched, strict=True)])
    assert rel.max() < 1e-2 and rel.median() < 1e-6 and (rel == 0).float().mean() > 0.5
    for (s1, z1), (s2, z2) in zip(one, batched, strict=True):
        assert s1.shape == s2.shape == (4,)
        assert (z2 - z1).abs().max() <= 1  # a zero point may round the other way on a last-bit difference

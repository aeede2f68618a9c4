"""LSQ activation-step learning (BRECQ and Q-Diffusion's activation stage) on a two-unit net.

What defines it: inputs and targets both from the FP model (asym=False), zero points fixed, the
loss falls from a poor initial step, quantizers at >= 16 bits (and weight quantizers) left alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods import pipeline
from tfmq_exp.models.adapters import Unit
from tfmq_exp.quant.recipe import QuantizerSpec, QuantRecipe, QuantRule
from tfmq_exp.quant.swap import activation_quantizers, init_weight_ranges, swap_modules
from tfmq_exp.recon.engine import FabricRunner, ReconSettings

torch.set_num_threads(1)
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


class TwoUnits(nn.Module):
    """Denoiser-shaped (x, t) net: block u1, a t-dependent scale, block u2."""

    def __init__(self):
        super().__init__()
        self.u1 = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
        self.u2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x, t):
        return self.u2(self.u1(x) * scale_of(t))


def scale_of(t: torch.Tensor) -> torch.Tensor:
    return 1 + t.view(-1, 1, 1, 1).float() / 1000


def setup(poor: float = 1.0):
    """FP net; W4A4 copy whose ``u2.2`` input is at 16 bits; ranges calibrated, then scaled by ``poor``."""
    torch.manual_seed(0)
    fp = TwoUnits().eval()
    q = copy.deepcopy(fp)
    recipe = QuantRecipe().with_bits(4, 4)
    recipe.rules = [QuantRule("u2.2", act_bits=16)]
    swap_modules(q, recipe)
    init_weight_ranges(q)
    pool = CalibRecord(xs=torch.randn(2, 32, 2, 6, 6), ts=torch.tensor([800, 200])).pool()
    pipeline.init_activations(q, pool, 32, seed=0, running_stat=False, batch_size=32)
    for a in activation_quantizers(q):
        if a.n_bits < 16:
            a.scale = a.scale * poor
    units = [Unit("u1", q.u1, "block"), Unit("u2", q.u2, "block")]
    return fp, q, pool, units


def full_loss(q: TwoUnits, fp: TwoUnits, pool, p: float = 2.4) -> float:
    """The LSQ objective of both units on the whole pool, from FP inputs, computed here."""
    with torch.no_grad():
        h = fp.u1(pool.x)
        l1 = (q.u1(pool.x) - h).abs().pow(p).sum(1).mean()
        h2 = h * scale_of(pool.t)
        l2 = (q.u2(h2) - fp.u2(h2)).abs().pow(p).sum(1).mean()
    return float(l1 + l2)


def test_inputs_and_targets_come_from_the_fp_model(monkeypatch):
    fp, q, pool, units = setup()
    seen = []
    real = pipeline.capture_io

    def spy(model, unit, batches, run, storage="cpu", desc=None):
        inputs, targets = real(model, unit, batches, run, storage)
        seen.append((model, unit, inputs.args[0].data, targets))
        return inputs, targets

    monkeypatch.setattr(pipeline, "capture_io", spy)
    with torch.no_grad():
        quantized_in = q.u1(pool.x) * scale_of(pool.t)  # what asym caching would give u2
    pipeline.lsq_stage(q, fp, units, pool, ReconSettings(act_iters=5, batch_size=16), FabricRunner(), 0)

    assert [(m is fp, u is getattr(fp, n)) for (m, u, _, _), n in zip(seen, ["u1", "u2"])] == [(True, True)] * 2
    assert len(seen) == 2  # one FP pass per unit: inputs and targets together
    with torch.no_grad():
        fp_in = fp.u1(pool.x) * scale_of(pool.t)
        torch.testing.assert_close(seen[0][2], pool.x, **CLOSE)
        torch.testing.assert_close(seen[0][3], fp.u1(pool.x), **CLOSE)
        torch.testing.assert_close(seen[1][2], fp_in, **CLOSE)
        torch.testing.assert_close(seen[1][3], fp.u2(fp_in), **CLOSE)
    assert (quantized_in - fp_in).abs().max() > 1e-2  # asym inputs would be different


def test_zero_points_fixed_scales_learned_and_the_loss_falls(monkeypatch):
    fp, q, pool, units = setup(poor=0.3)  # steps far too small: heavy clipping
    acts = [a for a in activation_quantizers(q) if a.n_bits < 16]
    assert len(acts) == 3  # u1.0, u1.2, u2.0 (u2.2's input is at 16 bits)
    z0 = [a.zero_point.clone() for a in acts]
    s0 = [a.scale.clone() for a in acts]
    before = full_loss(q, fp, pool)
    s = ReconSettings(act_iters=200, act_lr=2e-3, batch_size=16, eval_samples=64)
    reps = pipeline.lsq_stage(q, fp, units, pool, s, FabricRunner(), 0)
    after = full_loss(q, fp, pool)

    assert [r["unit"] for r in reps] == ["u1", "u2"]
    assert all(r["stage"] == "act" and r["loss_after"] < r["loss_before"] for r in reps), reps
    assert after < 0.7 * before, (before, after)
    for a, z, s_old in zip(acts, z0, s0):
        assert torch.equal(a.zero_point, z)  # bit-identical: LSQ learns the step only
        assert a.scale.item() > s_old.item()  # the too-small steps grew
        assert not isinstance(a.scale, nn.Parameter)  # back to a buffer after the stage


def test_sixteen_bit_and_weight_quantizers_are_skipped(monkeypatch):
    fp, q, pool, units = setup(poor=0.3)
    wide = q.u2[2].input_quantizer
    assert wide.n_bits == 16 and wide.enabled and wide.initialized
    frozen = [wide] + [m.weight_quantizer for m in (q.u1[0], q.u1[2], q.u2[0], q.u2[2])]
    state = [(qz.scale.clone(), qz.zero_point.clone()) for qz in frozen]
    learned = []
    real = pipeline.optimize_steps

    def spy(qs, *args, **kwargs):
        learned.extend(qs)
        return real(qs, *args, **kwargs)

    monkeypatch.setattr(pipeline, "optimize_steps", spy)
    pipeline.lsq_stage(q, fp, units, pool, ReconSettings(act_iters=50, act_lr=2e-3, batch_size=16), FabricRunner(), 0)

    assert {id(x) for x in learned} == {id(a) for a in activation_quantizers(q) if a.n_bits < 16}
    for qz, (scale, zp) in zip(frozen, state):
        assert torch.equal(qz.scale, scale) and torch.equal(qz.zero_point, zp)
        assert not isinstance(qz.scale, nn.Parameter)


def test_skip_bits_is_the_threshold():
    """With skip_bits=8 the 4-bit quantizers are learned and nothing at 8 bits or more is."""
    fp, q, pool, units = setup()
    q.u1[2].input_quantizer.n_bits = 8  # recalibrate the ranges with this one at 8 bits
    pipeline.init_activations(q, pool, 32, seed=0, running_stat=False, batch_size=32)
    eight = q.u1[2].input_quantizer
    s8, s4 = eight.scale.clone(), q.u1[0].input_quantizer.scale.clone()
    pipeline.lsq_stage(q, fp, units, pool, ReconSettings(act_iters=20, act_lr=2e-3, batch_size=16), FabricRunner(), 0,
                       skip_bits=8)
    assert torch.equal(eight.scale, s8)
    assert not torch.equal(q.u1[0].input_quantizer.scale, s4)


def test_per_tensor_weight_quantizers_are_not_learned():
    """LSQ learns activation steps only: a per-tensor weight grid (quantizer.weight.per_channel=false) keeps the
    scale AdaRound rounded against, or the hard-rounded integer codes change under it."""
    torch.manual_seed(0)
    fp = TwoUnits().eval()
    q = copy.deepcopy(fp)
    swap_modules(q, QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=False), act=QuantizerSpec(n_bits=4)))
    init_weight_ranges(q)
    pool = CalibRecord(xs=torch.randn(2, 32, 2, 6, 6), ts=torch.tensor([800, 200])).pool()
    pipeline.init_activations(q, pool, 32, seed=0, running_stat=False, batch_size=32)
    weights = [m.weight_quantizer for m in (q.u1[0], q.u1[2], q.u2[0], q.u2[2])]
    before = [w.scale.clone() for w in weights]
    units = [Unit("u1", q.u1, "block"), Unit("u2", q.u2, "block")]
    pipeline.lsq_stage(q, fp, units, pool, ReconSettings(act_iters=20, act_lr=2e-3, batch_size=16), FabricRunner(), 0)
    assert all(torch.equal(w.scale, b) for w, b in zip(weights, before)), [(float(b), float(w.scale))
                                                                            for w, b in zip(weights, before)]


class InPlace(nn.Module):
    """A unit that overwrites its input (as an in-place activation would)."""

    def forward(self, x):
        return x.mul_(2).add_(1)


def test_one_pass_capture_gives_the_inputs_and_outputs_of_two_passes():
    from tfmq_exp.recon.capture import capture_inputs, capture_io, capture_outputs

    fp, _, pool, _ = setup()
    net = nn.Sequential(nn.Conv2d(2, 2, 1), InPlace(), nn.Conv2d(2, 2, 1))

    def run(model, batch):
        return model(batch.x, batch.t) if model is fp else model(batch.x)

    for model, unit in ((fp, fp.u2), (net, net[1])):
        inputs, outputs = capture_io(model, unit, pool.batches(20), run)
        want_in = capture_inputs(model, unit, pool.batches(20), run)
        want_out = capture_outputs(model, unit, pool.batches(20), run)
        assert inputs.n == want_in.n == 64 and len(inputs.args) == len(want_in.args) == 1
        assert torch.equal(inputs.args[0].data, want_in.args[0].data)
        assert torch.equal(outputs, want_out)
    with torch.no_grad():  # the in-place unit: its input as it was before the unit changed it
        torch.testing.assert_close(inputs.args[0].data, net[0](pool.x), **CLOSE)
        torch.testing.assert_close(outputs, net[0](pool.x) * 2 + 1, **CLOSE)


def test_fp_captures_kept_from_the_weight_stage_give_the_same_lsq_result(monkeypatch):
    """Q-Diffusion's LSQ stage needs each unit's FP inputs and targets, which the weight stage's FP pass can
    capture at once: kept, the LSQ stage runs no FP forward and learns the same steps bit for bit; a budget
    that holds one unit keeps that one and the other is recaptured."""
    from tfmq_exp.recon.capture import FPCache

    def quantize(budget):
        fp, q, pool, units = setup(poor=3.0)
        kept = None if budget is None else FPCache(budget)
        s = ReconSettings(iters=10, batch_size=16, act_iters=20, act_lr=2e-3)
        pipeline.weight_stage(q, fp, units, pool, s, FabricRunner(), 0, keep_fp=kept)
        pipeline.init_activations(q, pool, 32, seed=0, running_stat=False, batch_size=32)
        for a in activation_quantizers(q):
            if a.n_bits < 16:
                a.scale = a.scale * 3.0
        calls = []
        hook = fp.register_forward_pre_hook(lambda *_: calls.append(1))
        pipeline.lsq_stage(q, fp, units, pool, s, FabricRunner(), 0, kept=kept)
        hook.remove()
        return {k: v.clone() for k, v in q.state_dict().items()}, len(calls), kept

    ref, ref_calls, _ = quantize(None)
    got, calls, kept = quantize(2**30)
    one, one_calls, one_kept = quantize(64 * (4 * 2 * 36 + 4 * 4 * 36) + 1)  # u1's inputs and outputs only
    # 64 samples in batches of 32: two FP forwards per recaptured unit
    assert (ref_calls, calls, one_calls) == (4, 0, 2)
    assert kept.units == {} and one_kept.units == {}  # released as the LSQ stage used them
    assert ref.keys() == got.keys() == one.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]) and torch.equal(ref[k], one[k]), k
    initial = setup()[1].state_dict()
    assert any(not torch.equal(ref[k], initial[k]) for k in ref if k.endswith("scale"))  # LSQ moved steps

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


class _IndexedCpuRunner(FabricRunner):
    """A CPU runner whose device reads 'cpu:0', so the runner's device and host memory ('cpu') differ."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu", 0)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("cache_on", ["device", "host"])
def test_caches_live_where_cache_on_puts_them(monkeypatch, cache_on, keep):
    """Both stages pass the storage cache_on names to the capture, and the cached tensors are there (also
    the FP inputs and targets the weight stage keeps for the LSQ stage)."""
    import tfmq_exp.methods.pipeline as pipeline
    from tfmq_exp.recon.capture import FPCache

    seen = []
    real_in, real_out, real_io = pipeline.capture_inputs, pipeline.capture_outputs, pipeline.capture_io

    def cap_in(model, unit, batches, run, storage="cpu", desc=None):
        out = real_in(model, unit, batches, run, storage)
        seen.append((storage, out.args[0].data.device))
        return out

    def cap_out(model, unit, batches, run, storage="cpu", desc=None):
        out = real_out(model, unit, batches, run, storage)
        seen.append((storage, out.device))
        return out

    def cap_io(model, unit, batches, run, storage="cpu", desc=None):
        inputs, out = real_io(model, unit, batches, run, storage)
        seen.extend([(storage, inputs.args[0].data.device), (storage, out.device)])
        return inputs, out

    monkeypatch.setattr(pipeline, "capture_inputs", cap_in)
    monkeypatch.setattr(pipeline, "capture_outputs", cap_out)
    monkeypatch.setattr(pipeline, "capture_io", cap_io)
    fp, q, rec = _setup()
    pool, runner = rec.pool(1), _IndexedCpuRunner()
    unit = SimpleNamespace(name="block", module=q.block, kind="block")
    s = ReconSettings(iters=5, batch_size=16, act_iters=5)
    kept = FPCache(2**30) if keep else None
    weight_stage(q, fp, [unit], pool, s, runner, seed=0, cache_on=cache_on, keep_fp=kept)
    init_activations(q, pool, 16, seed=0, running_stat=False, batch_size=16)
    lsq_stage(q, fp, [unit], pool, s, runner, seed=0, cache_on=cache_on, kept=kept)
    expected = runner.device if cache_on == "device" else torch.device("cpu")
    # weight stage: its inputs, FP targets (+ FP inputs when kept); LSQ stage: FP inputs and targets unless kept
    assert len(seen) == (3 if keep else 4)
    assert all(torch.device(storage) == expected and dev.type == expected.type for storage, dev in seen), seen


def test_unknown_cache_placement_is_an_error():
    fp, q, rec = _setup()
    unit = SimpleNamespace(name="block", module=q.block, kind="block")
    with pytest.raises(ValueError, match="cache_on"):
        weight_stage(q, fp, [unit], rec.pool(1), ReconSettings(iters=1), FabricRunner(), seed=0, cache_on="gpu0")


@pytest.mark.parametrize("keep", [False, True])
def test_reduced_precision_fp_targets_are_float32_and_move_the_targets_only_by_bf16_rounding(monkeypatch, keep):
    """recon.fp_precision=bf16: every FP capture (targets, kept FP inputs, the LSQ stage's recapture) ran under
    autocast, is stored back in float32, and differs from the f32 capture by bf16's rounding, not more."""
    import tfmq_exp.methods.pipeline as pipeline
    from tfmq_exp.recon.capture import FPCache

    seen: dict[str, list[torch.Tensor]] = {"f32": [], "bf16": []}
    real_out, real_io = pipeline.capture_outputs, pipeline.capture_io

    def cap_out(model, unit, batches, run, storage="cpu", desc=None):
        out = real_out(model, unit, batches, run, storage)
        seen[mode].append(out)
        return out

    def cap_io(model, unit, batches, run, storage="cpu", desc=None):
        inputs, out = real_io(model, unit, batches, run, storage)
        seen[mode].append(out)
        return inputs, out

    monkeypatch.setattr(pipeline, "capture_outputs", cap_out)
    monkeypatch.setattr(pipeline, "capture_io", cap_io)
    stored = {}
    for mode in ("f32", "bf16"):
        fp, q, rec = _setup()
        pool, runner = rec.pool(1), FabricRunner()
        unit = SimpleNamespace(name="block", module=q.block, kind="block")
        s = ReconSettings(iters=5, batch_size=16, act_iters=5, fp_precision=mode)
        kept = FPCache(2**30) if keep else None
        real_offer = kept.offer if keep else None
        if keep:
            def offer(name, inputs, outputs, real_offer=real_offer, mode=mode):
                stored[mode] = (inputs.args[0].data, outputs)
                return real_offer(name, inputs, outputs)
            kept.offer = offer
        weight_stage(q, fp, [unit], pool, s, runner, seed=0, keep_fp=kept)
        init_activations(q, pool, 16, seed=0, running_stat=False, batch_size=16)
        lsq_stage(q, fp, [unit], pool, s, runner, seed=0, kept=kept)
    assert len(seen["bf16"]) == (1 if keep else 2)  # the LSQ stage recaptures unless the weight stage kept
    for a, b in zip(seen["f32"], seen["bf16"], strict=True):
        assert a.dtype == torch.float32 and b.dtype == torch.bfloat16  # the capture itself ran under autocast
        rel = (b.float() - a).norm() / a.norm()
        assert 0 < rel < 2e-2  # bf16 keeps 8 bits of mantissa: about 0.4 % per value
    if keep:
        for t in (*stored["bf16"],):
            assert t.dtype == torch.float32  # stored back in the reconstruction's precision
        assert not torch.equal(stored["bf16"][1], stored["f32"][1])

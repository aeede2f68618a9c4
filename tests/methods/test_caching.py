"""Input caching of the weight stage (asym reconstruction), checked against hand computations.

A unit's inputs come from the quantized model with activations off, upstream units that were already
reconstructed at their hard rounding and units not reconstructed yet at round-to-nearest; its targets
come from the FP model; layers in ``exclude`` keep their rounding and get no alpha.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods import pipeline
from tfmq_exp.models.adapters import Unit
from tfmq_exp.quant.recipe import QuantRecipe
from tfmq_exp.quant.swap import activation_quantizers, init_weight_ranges, swap_modules
from tfmq_exp.recon.engine import FabricRunner, ReconSettings

torch.set_num_threads(1)
SETTINGS = ReconSettings(iters=40, batch_size=8, lr=0.05, eval_samples=32)  # a high lr: rounding flips
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


class TwoUnits(nn.Module):
    """Denoiser-shaped (x, t) net: block u1, a t-dependent scale, block u2, a 1x1 head layer."""

    def __init__(self):
        super().__init__()
        self.u1 = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
        self.u2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1))
        self.head = nn.Conv2d(2, 2, 1)

    def forward(self, x, t):
        return self.head(self.u2(self.u1(x) * scale_of(t)))


def scale_of(t: torch.Tensor) -> torch.Tensor:
    return 1 + t.view(-1, 1, 1, 1).float() / 1000


def setup():
    """FP net, its W4A4 copy with calibrated activation ranges (enabled), a 32-sample pool."""
    torch.manual_seed(0)
    fp = TwoUnits().eval()
    q = copy.deepcopy(fp)
    swap_modules(q, QuantRecipe().with_bits(4, 4))
    init_weight_ranges(q)
    rec = CalibRecord(xs=torch.randn(2, 16, 2, 6, 6), ts=torch.tensor([800, 200]))
    pool = rec.pool()
    pipeline.init_activations(q, pool, 16, seed=0, running_stat=False, batch_size=16)
    assert all(a.enabled and a.initialized for a in activation_quantizers(q))
    return fp, q, pool


def units(q: TwoUnits, names: list[str]) -> list[Unit]:
    return [Unit(n, getattr(q, n), "layer" if n == "head" else "block") for n in names]


@pytest.fixture
def spy(monkeypatch):
    """Record each capture: which unit, from which model, the cached result, the activation state."""
    seen: list[dict] = []
    real_in, real_out = pipeline.capture_inputs, pipeline.capture_outputs

    def cap_in(model, unit, batches, run, storage="cpu", desc=None):
        acts = [a.enabled for a in activation_quantizers(model)]
        out = real_in(model, unit, batches, run, storage)
        seen.append({"what": "inputs", "model": model, "unit": unit, "value": out.args[0].data, "acts": acts})
        return out

    def cap_out(model, unit, batches, run, storage="cpu", desc=None):
        out = real_out(model, unit, batches, run, storage)
        seen.append({"what": "targets", "model": model, "unit": unit, "value": out})
        return out

    monkeypatch.setattr(pipeline, "capture_inputs", cap_in)
    monkeypatch.setattr(pipeline, "capture_outputs", cap_out)
    return seen


def _by_hand_conv(conv: nn.Conv2d, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The conv with weights at FP, round-to-nearest or hard AdaRound, computed from scale/z/alpha."""
    qz = conv.weight_quantizer
    w, s, z = conv.weight.detach(), qz.scale, qz.zero_point
    if mode == "nearest":
        w = (torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s
    elif mode == "hard":
        w = (torch.clamp(torch.floor(w / s) + (qz.alpha.detach() >= 0).float() + z, 0, 15) - z) * s
    return F.conv2d(x, w, conv.bias, padding=conv.padding)


def u1_by_hand(q: TwoUnits, x: torch.Tensor, mode: str) -> torch.Tensor:
    with torch.no_grad():
        return _by_hand_conv(q.u1[2], F.silu(_by_hand_conv(q.u1[0], x, mode)), mode)


def test_downstream_inputs_come_from_the_hard_rounded_upstream_unit(spy):
    fp, q, pool = setup()
    nearest_u1 = u1_by_hand(q, pool.x, "nearest")
    pipeline.weight_stage(q, fp, units(q, ["u1", "u2"]), pool, SETTINGS, FabricRunner(), 0)
    cap = {(c["what"], id(c["unit"])): c for c in spy}

    u1_in = cap[("inputs", id(q.u1))]
    assert u1_in["model"] is q and not any(u1_in["acts"])  # activations off while caching
    assert torch.equal(u1_in["value"], pool.x)
    u2_in = cap[("inputs", id(q.u2))]
    assert u2_in["model"] is q and not any(u2_in["acts"])
    expected = u1_by_hand(q, pool.x, "hard") * scale_of(pool.t)
    torch.testing.assert_close(u2_in["value"], expected, **CLOSE)
    # what other caching rules would give is far from it: the test can tell them apart
    with torch.no_grad():
        fp_in = fp.u1(pool.x) * scale_of(pool.t)
        for a in activation_quantizers(q):  # off since the weight stage: switch them on
            a.enabled = True
        act_on_in = q.u1(pool.x) * scale_of(pool.t)
    for other in (fp_in, nearest_u1 * scale_of(pool.t), act_on_in):
        assert (other - expected).abs().max() > 1e-3

    # targets: the FP model's unit outputs, whatever the quantized model holds
    assert cap[("targets", id(fp.u1))]["model"] is fp
    torch.testing.assert_close(cap[("targets", id(fp.u1))]["value"], fp.u1(pool.x).detach(), **CLOSE)
    torch.testing.assert_close(cap[("targets", id(fp.u2))]["value"], fp.u2(fp_in).detach(), **CLOSE)


def test_units_not_reconstructed_yet_feed_round_to_nearest(spy):
    """With u2 first (an order other than forward), u2 sees u1 at its initial round-to-nearest weights."""
    fp, q, pool = setup()
    expected = u1_by_hand(q, pool.x, "nearest") * scale_of(pool.t)
    pipeline.weight_stage(q, fp, units(q, ["u2", "u1"]), pool, SETTINGS, FabricRunner(), 0)
    (u2_in,) = [c for c in spy if c["what"] == "inputs" and c["unit"] is q.u2]
    torch.testing.assert_close(u2_in["value"], expected, **CLOSE)
    with torch.no_grad():
        fp_in = fp.u1(pool.x) * scale_of(pool.t)
    assert (fp_in - expected).abs().max() > 1e-3  # the weights were quantized, not FP


def test_excluded_layers_keep_their_rounding_and_get_no_alpha(spy):
    fp, q, pool = setup()
    kept = q.u2[2].weight_quantizer  # a layer that was already rounded (as TIAR's layers are)
    kept.enable_adaround(q.u2[2].weight.detach())
    with torch.no_grad():
        kept.alpha.copy_(torch.where(torch.rand(kept.alpha.shape) < 0.5, -4.0, 4.0))
    kept.rounding = "hard"
    alpha = kept.alpha.detach().clone()
    exclude = {"u2.2", "head"}
    pipeline.weight_stage(q, fp, units(q, ["u1", "u2", "head"]), pool, SETTINGS, FabricRunner(), 0, exclude=exclude)

    assert kept.rounding == "hard" and torch.equal(kept.alpha, alpha)
    assert q.u2[0].weight_quantizer.alpha is not None and q.u2[0].weight_quantizer.rounding == "hard"
    assert q.head.weight_quantizer.alpha is None and q.head.weight_quantizer.rounding == "nearest"
    assert not [c for c in spy if c["unit"] is q.head or c["unit"] is fp.head]  # an excluded unit is skipped
    # u2 was reconstructed with the excluded layer at its kept (hard) rounding: its loss sees that layer
    (u2_in,) = [c for c in spy if c["what"] == "inputs" and c["unit"] is q.u2]
    with torch.no_grad():
        h = F.silu(_by_hand_conv(q.u2[0], u2_in["value"], "hard"))
        torch.testing.assert_close(q.u2(u2_in["value"]), _by_hand_conv(q.u2[2], h, "hard"), **CLOSE)

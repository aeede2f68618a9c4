"""frozen_weights: each layer's quantized weight computed once, the same outputs bit for bit, dropped on change."""

from __future__ import annotations

import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from tfmq_exp.quant import QuantizerSpec, QuantRecipe, frozen_weights, quant_modules, set_quant_state
from tfmq_exp.quant.swap import calibrate_activations, init_weight_ranges, swap_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from tiny_unets import tiny_unet  # noqa: E402

torch.set_num_threads(1)


def quantized_net(soft_last: bool = False) -> nn.Module:
    """Conv (hard AdaRound), split-shortcut conv (nearest), Linear (hard, or soft with ``soft_last``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
                        nn.Linear(8 * 36, 5))
    swap_modules(net, QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=True), act=QuantizerSpec(n_bits=8)),
                 splits={"2": 3})
    init_weight_ranges(net)
    for i in (0, 4):
        net[i].weight_quantizer.enable_adaround(net[i].weight)
        net[i].weight_quantizer.rounding = "hard"
    with torch.no_grad():  # learned roundings that differ from nearest
        net[0].weight_quantizer.alpha.normal_()
        net[4].weight_quantizer.alpha.normal_()
    if soft_last:
        net[4].weight_quantizer.rounding = "soft"
    x = torch.randn(16, 3, 6, 6)
    calibrate_activations(net, lambda m: m(x))
    net.requires_grad_(False)
    if soft_last:
        net[4].weight_quantizer.alpha.requires_grad_(True)  # what AdaRound trains
    return net


def count_weight_calls(net: nn.Module) -> list[int]:
    calls = [0]
    for _, m in quant_modules(net):
        for q in m.weight_quantizers():
            orig = q.forward

            def wrapped(x, orig=orig):  # noqa: ANN001, ANN202
                calls[0] += 1
                return orig(x)

            q.forward = wrapped
    return calls


@torch.no_grad()
def test_outputs_are_bit_identical_and_weights_are_quantized_once():
    net = quantized_net()
    x = torch.randn(16, 3, 6, 6)
    ref = net(x)
    calls = count_weight_calls(net)
    with frozen_weights(net) as n:
        once = calls[0]
        outs = [net(x) for _ in range(3)]
    assert n == 3  # both convs (the split one has two weight quantizers) and the Linear
    assert once == 4 and calls[0] == 4  # 1 + 2 (split) + 1 at entry, none in the three forwards
    for y in outs:
        assert torch.equal(y, ref)
    assert all("_frozen_weight" not in m.__dict__ for _, m in quant_modules(net))
    net(x)
    assert calls[0] == 8  # outside the context: quantized per forward again


def test_a_rounding_being_learned_is_not_frozen_and_gets_its_gradient():
    net = quantized_net(soft_last=True)
    x = torch.randn(16, 3, 6, 6)
    alpha = net[4].weight_quantizer.alpha
    net(x).square().sum().backward()
    ref = alpha.grad.clone()
    alpha.grad = None
    with frozen_weights(net) as n:
        net(x).square().sum().backward()
    assert n == 2
    assert torch.equal(alpha.grad, ref) and ref.abs().sum() > 0


@torch.no_grad()
def test_a_frozen_value_is_dropped_when_the_layer_changes():
    net = quantized_net()
    x = torch.randn(16, 3, 6, 6)
    with frozen_weights(net):
        net(x)
        net[0].weight.mul_(0.5)  # in place: a new version of the weight
        assert net[0].frozen_weight() is None
        fresh = copy.deepcopy(net)
        assert torch.equal(net(x), fresh(x))
        net[4].weight_quantizer.init_range(net[4].weight)  # a new range tensor
        assert net[4].frozen_weight() is None
        assert net[2].frozen_weight() is not None
        net[2].weight.data = net[2].weight.data.clone()  # new storage, as module.to(device) gives
        assert net[2].frozen_weight() is None
        set_quant_state(net, weight=False)  # weight quantization off: the raw weights
        assert all(m.frozen_weight() is None for _, m in quant_modules(net))
        y = net(x)
    set_quant_state(net, weight=False)
    assert torch.equal(y, net(x))


@torch.no_grad()
def test_hard_rounding_set_inside_the_context_is_not_served_a_stale_soft_value():
    net = quantized_net(soft_last=True)
    with frozen_weights(net):
        assert net[4].frozen_weight() is None  # soft: never frozen
        net[4].weight_quantizer.rounding = "hard"
        w = net[4].quantized_weight()
    assert torch.equal(w, net[4].quantized_weight())


@torch.no_grad()
def test_fsc_tables_are_the_same_with_frozen_weights(monkeypatch):
    """The per-step tables of a tiny UNet with hard-rounded weights: frozen weights change no bit."""
    from tfmq_exp.diffusion.calib_data import CalibRecord
    from tfmq_exp.methods import pipeline
    from tfmq_exp.models import adapters
    from tfmq_exp.quant.swap import activation_quantizers

    torch.manual_seed(0)
    q = tiny_unet()
    swap_modules(q, QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=True), act=QuantizerSpec(n_bits=8)))
    init_weight_ranges(q)
    for _, m in quant_modules(q):
        m.weight_quantizer.enable_adaround(m.weight)
        m.weight_quantizer.rounding = "hard"
        m.weight_quantizer.alpha.data.normal_()
    xs = torch.randn(3, 24, 1, 8, 8) * torch.tensor([1.0, 0.5, 0.2]).view(-1, 1, 1, 1, 1)
    rec = CalibRecord(xs=xs, ts=torch.tensor([900, 500, 50]))

    def tables(model: nn.Module) -> list[torch.Tensor]:
        qs = list(activation_quantizers(model)) + list(adapters.attention_quantizers(model).values())
        pipeline.fsc_stage(model, {k: rec.pool(steps=[k]) for k in range(3)}, 3, qs, init_samples=8,
                           batch_size=8, momentum=0.95, seed=1)
        return [t for x in qs for t in (x.step_scale, x.step_zero_point)]

    frozen = tables(copy.deepcopy(q))
    monkeypatch.setattr(pipeline, "frozen_weights", lambda m: nullcontext(0))
    per_forward = tables(copy.deepcopy(q))
    assert len(frozen) > 20
    for a, b in zip(frozen, per_forward, strict=True):
        assert torch.equal(a, b)

"""Module swap, rules, quantizer states, per-step tables, checkpoint round trip."""

import copy

import pytest
import torch
from torch import nn

from tfmq_exp.quant import QuantRecipe, QuantRule, quant_summary, quantize, set_quant_state, step_context
from tfmq_exp.quant.modules import QuantConv2d, QuantLinear, quant_modules
from tfmq_exp.quant.quantizer import StepNotCalibratedError, UniformQuantizer
from tfmq_exp.quant.recipe import parse_bits
from tfmq_exp.quant.state import load_quantized, save_quantized
from tfmq_exp.quant.swap import swap_modules


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.conv_in(x)).mean((2, 3)))


def recipe(bits="w4a8", rules=()):
    return QuantRecipe(rules=list(rules)).with_bits(*parse_bits(bits))


def test_swap_keeps_outputs_while_quantization_is_off():
    torch.manual_seed(0)
    fp = Tiny()
    q = copy.deepcopy(fp)
    x = torch.randn(3, 1, 8, 8)
    quantize(q, recipe(), lambda m: m(x))
    assert isinstance(q.conv_in, QuantConv2d) and isinstance(q.head, QuantLinear)
    assert isinstance(q.conv_in, nn.Conv2d)  # diffusers' isinstance checks keep working
    set_quant_state(q, weight=False, act=False)
    assert torch.equal(q(x), fp(x))
    set_quant_state(q, weight=True, act=True)
    assert not torch.equal(q(x), fp(x))


def test_rules_by_pattern():
    m = Tiny()
    fp_conv_in = QuantRule("conv_in", quantize_weight=False, quantize_input=False)
    r = recipe(rules=[fp_conv_in, QuantRule("head", weight_bits=8)])
    quantize(m, r, lambda mm: mm(torch.randn(2, 1, 8, 8)))
    assert not m.conv_in.weight_quantizer.enabled and not m.conv_in.input_quantizer.enabled
    assert m.body[1].weight_quantizer.n_bits == 4
    assert m.head.weight_quantizer.n_bits == 8
    text = quant_summary(m)
    assert "conv_in" in text and "3 layers: 2 with quantized weights, 2 with quantized inputs" in text


def test_skip_rule_leaves_module_unwrapped():
    m = swap_modules(Tiny(), recipe(rules=[QuantRule("head", skip=True)]))
    assert type(m.head) is nn.Linear
    assert [n for n, _ in quant_modules(m)] == ["conv_in", "body.1"]


def test_w32_means_weights_stay_fp():
    m = Tiny()
    quantize(m, recipe("w8a32"))
    assert all(not mod.input_quantizer.enabled for _, mod in quant_modules(m))
    assert all(mod.weight_quantizer.enabled for _, mod in quant_modules(m))


@pytest.mark.parametrize("bad", ["w3a9", "w4", "a8", "int8", "w0a8"])
def test_parse_bits_rejects(bad):
    with pytest.raises(ValueError, match="invalid bits"):
        parse_bits(bad)


def test_parse_bits_accepts():
    assert parse_bits("w4a8") == (4, 8)
    assert parse_bits("fp") == (32, 32)


def test_activation_quantizer_needs_calibration():
    q = UniformQuantizer(8)
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.randn(4))


def test_running_stat_ema():
    q = UniformQuantizer(8, init="minmax")
    q.observing = q.running_stat = True
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-3.0, 5.0]))
    assert q.x_min.item() == pytest.approx(0.95 * -1 + 0.05 * -3)
    assert q.x_max.item() == pytest.approx(0.95 * 1 + 0.05 * 5)
    assert q.scale.item() == pytest.approx((q.x_max - q.x_min).item() / 255)


def test_step_tables_use_current_step():
    q = UniformQuantizer(8)
    q.set_step_tables(torch.tensor([0.1, 1.0]), torch.tensor([0.0, 0.0]))
    x = torch.tensor([0.26])
    with step_context(0):
        assert q(x).item() == pytest.approx(0.3)
    with step_context(1):
        assert q(x).item() == pytest.approx(0.0)
    with step_context(5), pytest.raises(StepNotCalibratedError, match="step 5 was never calibrated"):
        q(x)


def test_split_quantizers_get_separate_ranges():
    conv = nn.Conv2d(4, 2, 1)
    m = nn.Sequential(conv)
    swap_modules(m, recipe(), splits={"0": 2})
    x = torch.cat([torch.randn(2, 2, 3, 3) * 0.1, torch.randn(2, 2, 3, 3) * 10], 1)
    from tfmq_exp.quant.swap import calibrate_activations

    calibrate_activations(m, lambda mm: mm(x))
    c = m[0]
    assert c.input_quantizer.scale.item() * 20 < c.input_quantizer_split.scale.item()


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    fp = Tiny()
    q = copy.deepcopy(fp)
    x = torch.randn(3, 1, 8, 8)
    r = recipe(rules=[QuantRule("conv_in", quantize_input=False)])
    quantize(q, r, lambda m: m(x))
    path = save_quantized(q, r, tmp_path / "q.safetensors", {"model": "tiny"})
    back, r2, meta = load_quantized(copy.deepcopy(fp), path)
    assert meta == {"model": "tiny"} and r2 == r
    assert torch.equal(back(x), q(x))


def test_checkpoint_stores_integer_weights_and_reloads_adaround_bit_identical(tmp_path):
    torch.manual_seed(0)
    fp = Tiny()
    q = copy.deepcopy(fp)
    x = torch.randn(3, 1, 8, 8)
    r = recipe()
    m = nn.Sequential(q)
    quantize(m, r, lambda mm: mm(x))
    for _, mod in quant_modules(m):
        mod.weight_quantizer.enable_adaround(mod.weight.detach())
        mod.weight_quantizer.alpha.data.normal_()
        mod.weight_quantizer.rounding = "hard"
    path = save_quantized(m, r, tmp_path / "q.safetensors")
    from safetensors.torch import load_file

    raw = load_file(str(path))
    assert raw["0.conv_in.weight_int"].dtype == torch.uint8 and int(raw["0.conv_in.weight_int"].max()) <= 15
    assert "0.conv_in.weight" not in raw and not any(k.endswith("alpha") for k in raw)
    back, _, _ = load_quantized(nn.Sequential(copy.deepcopy(fp)), path)
    assert torch.equal(back(x), m(x))

"""Sizes and bit operations against hand counts."""

from __future__ import annotations

import torch
from torch import nn

from tfmq_exp.export.size_report import bops_per_step, size_report
from tfmq_exp.quant import QuantizerSpec, QuantRecipe, quantize


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)  # 72 weights + 4 bias
        self.fc = nn.Linear(4, 3)  # 12 weights + 3 bias

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_size_and_bops_by_hand():
    net = Net().eval()
    recipe = QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=True), act=QuantizerSpec(n_bits=8))
    quantize(net, recipe, lambda m: m(torch.randn(2, 2, 5, 5), torch.zeros(2)))
    rep = size_report(net)
    assert rep["params"] == 91
    assert rep["fp32_bytes"] == 91 * 4
    # codes: 72 and 12 four-bit codes = 36 + 6 bytes; per channel scale + zp: 5 * (4 + 3);
    # biases 7 floats; two activation quantizers: 5 bytes each
    assert rep["packed_bytes"] == 36 + 6 + 35 + 28 + 10
    assert rep["ratio_fp32"] == round(115 / 364, 4)
    b = bops_per_step(net, (2, 5, 5))
    macs = 4 * 25 * 18 + 3 * 4  # conv: 4 outputs x 25 positions x 18 MACs; fc: 3 x 4
    assert b["macs_g"] == round(macs / 1e9, 6)
    assert b["bops_g"] == round(macs * 4 * 8 / 1e9, 4)
    assert b["bops_ratio"] == round(32 / 1024, 4)

"""What a quantized UNet weighs and costs: bytes in FP32, FP16 and packed form, and bit operations.

Packed bytes count what ``packing.pack_checkpoint`` stores: weight codes at their bit width
(two 4-bit codes per byte), a float32 scale and a one-byte zero point per output channel, every
other parameter in float32 (the FP layers as they are), and each enabled activation quantizer's
scale and zero point, or its per-step tables (5 bytes per step).

BOPs per denoising step (one sample) sum, over every Conv2d and Linear, MACs x weight bits x input
bits, with 32 for a full-precision side (the convention of the low-bit literature); the attention
score and value products are not Conv2d/Linear and are not counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tfmq_exp.quant.modules import QuantMixin
from tfmq_exp.quant.quantizer import UniformQuantizer
from tfmq_exp.quant.steps import step_context

MB = 1e6


def _act_bytes(q: UniformQuantizer) -> int:
    if not q.enabled:
        return 0
    return 5 * (q.step_scale.shape[0] if q.has_step_tables else 1)


def size_report(unet: nn.Module) -> dict[str, Any]:
    """FP32 / FP16 / packed sizes of a (fake-)quantized UNet, in MB (1e6 bytes), and the ratios."""
    n_params = 0
    packed = 0.0
    table_bytes = 0
    quant_weights: set[int] = set()
    weight_qs = {id(q) for m in unet.modules() if isinstance(m, QuantMixin) for q in m.weight_quantizers()}
    for _, mod in unet.named_modules():
        if isinstance(mod, QuantMixin):
            wq = mod.weight_quantizers()
            if any(q.enabled for q in wq):
                quant_weights.add(id(mod.weight))
                cols = [mod.split, mod.weight.shape[1] - mod.split] if mod.split else [mod.weight.shape[1]]
                per_col = mod.weight[0, 0].numel()  # kernel elements per input channel
                for q, c in zip(wq, cols):
                    n = mod.weight.shape[0] * c * per_col
                    packed += math.ceil(n * q.n_bits / 8) + 5 * mod.weight.shape[0]
        if isinstance(mod, UniformQuantizer) and id(mod) not in weight_qs:
            b = _act_bytes(mod)
            packed += b
            if mod.enabled and mod.has_step_tables:
                table_bytes += b
    for name, p in unet.named_parameters():
        if name.endswith(".alpha"):
            continue
        n_params += p.numel()
        if id(p) not in quant_weights:
            packed += 4 * p.numel()
    fp32 = 4 * n_params
    return {
        "params": n_params,
        "fp32_bytes": fp32,
        "packed_bytes": int(packed),
        "fp32_mb": round(fp32 / MB, 4),
        "fp16_mb": round(fp32 / 2 / MB, 4),
        "packed_mb": round(packed / MB, 4),
        "step_table_mb": round(table_bytes / MB, 6),
        "ratio_fp32": round(packed / fp32, 4),
        "ratio_fp16": round(packed / (fp32 / 2), 4),
    }


@torch.no_grad()
def bops_per_step(unet: nn.Module, sample_shape: tuple[int, ...], cond_shape: tuple[int, int] | None = None) -> dict:
    """MACs and BOPs of one UNet call on one sample (hooks on every Conv2d/Linear)."""
    macs = {"total": 0}
    bops = {"quantized": 0, "fp32": 0}

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        per_out = mod.weight[0].numel()  # MACs per output element
        m = out.numel() // out.shape[0] * per_out
        macs["total"] += m
        wb, ab = 32, 32
        if isinstance(mod, QuantMixin):
            if any(q.enabled for q in mod.weight_quantizers()):
                wb = mod.weight_quantizer.n_bits
            if any(q.enabled for q in mod.input_quantizers()):
                ab = mod.input_quantizer.n_bits
        bops["quantized"] += m * wb * ab
        bops["fp32"] += m * 32 * 32

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        x = torch.zeros(1, *sample_shape)
        t = torch.full((1,), 500, dtype=torch.long)
        args = (x, t) if cond_shape is None else (x, t, torch.zeros(1, *cond_shape))
        dev = next(unet.parameters()).device
        with step_context(0):
            unet(*(a.to(dev) for a in args))
    finally:
        for h in handles:
            h.remove()
    return {
        "macs_g": round(macs["total"] / 1e9, 6),
        "bops_g": round(bops["quantized"] / 1e9, 4),
        "bops_fp32_g": round(bops["fp32"] / 1e9, 4),
        "bops_ratio": round(bops["quantized"] / max(1, bops["fp32"]), 4),
    }


def deploy_report(unet: nn.Module, sample_shape: tuple[int, ...], cond_shape: tuple[int, int] | None = None) -> dict:
    """Sizes and BOPs per step together (task=quantize's results.json). BOPs need a plain ``unet(x, t)``
    call: for models that also need class labels they are reported as not measured."""
    try:
        bops: dict | str = bops_per_step(unet, sample_shape, cond_shape)
    except (TypeError, RuntimeError, ValueError) as err:
        bops = f"not measured: {str(err).splitlines()[0][:120]}"
    return {"size": size_report(unet), "bops_per_step": bops}

"""A printed table of what is quantized at which bits."""

from __future__ import annotations

from torch import nn

from tfmq_exp.quant.modules import QUANT_CLASSES, QuantMixin


def _bits(q, allowed: bool) -> str:  # noqa: ANN001
    return f"{q.n_bits}" if allowed else "fp"


def layer_table(model: nn.Module) -> list[tuple[str, str, str, str]]:
    """(name, type, weight bits, input bits) for every Conv2d/Linear, wrapped or not."""
    fp_types = tuple(QUANT_CLASSES)
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantMixin):
            w = _bits(mod.weight_quantizer, mod.allow_weight_quant)
            a = _bits(mod.input_quantizer, mod.allow_input_quant)
            if mod.split:
                a += f" (split@{mod.split})"
            rows.append((name, type(mod).__name__, w, a))
        elif isinstance(mod, fp_types):
            rows.append((name, type(mod).__name__, "fp", "fp"))
    return rows


def quant_summary(model: nn.Module) -> str:
    rows = layer_table(model)
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'type':<11}  {'W':>4}  A", "-" * (width + 26)]
    lines += [f"{n:<{width}}  {t:<11}  {w:>4}  {a}" for n, t, w, a in rows]
    nw = sum(r[2] != "fp" for r in rows)
    na = sum(r[3] != "fp" for r in rows)
    lines.append(f"{len(rows)} layers: {nw} with quantized weights, {na} with quantized inputs")
    return "\n".join(lines)

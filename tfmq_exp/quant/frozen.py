"""Fake-quantized weights computed once while they cannot change (calibration forwards, LSQ, sampling).

A fake-quant layer re-quantizes its weight on every forward (divide, round, clip, rescale over every
weight). Where no rounding is being learned that value is the same each time, and on a large model at a
small batch recomputing it is most of the quantization overhead (LDM-4 Bedrooms at batch 1 on a CPU:
1.0 s of a 3.2 s forward; experiments/forward_shortcuts.py). Inside ``frozen_weights(model)`` each
layer's quantized weight is computed once, by the same operations, so every forward gives the same
output bit for bit. It costs one copy of the quantized layers' weights while the context lasts.

A layer is left alone (quantized per forward, as outside the context) when its rounding is being
learned (AdaRound "soft") or its weight needs a gradient. A frozen value is dropped as soon as the
layer no longer matches it (``QuantMixin.frozen_weight``): the weight changed in place, a quantizer
got a new range tensor or another rounding, or weight quantization was switched off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tfmq_exp.quant.modules import QuantMixin, quant_modules


def _freezable(mod: QuantMixin) -> bool:
    qs = mod.weight_quantizers()
    return all(q.enabled and q.rounding != "soft" for q in qs) and not mod.weight.requires_grad


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[int]:
    """Quantize every eligible layer's weight once for the duration; yields how many layers were frozen."""
    mods = [m for _, m in quant_modules(model) if _freezable(m)]
    with torch.no_grad():
        for m in mods:
            m.__dict__["_frozen_weight"] = None
            value = m.quantized_weight()  # may initialise a weight range lazily: take the signature after
            m.__dict__["_frozen_weight"] = (value, m.weight_signature())
    try:
        yield len(mods)
    finally:
        for m in mods:
            m.__dict__.pop("_frozen_weight", None)

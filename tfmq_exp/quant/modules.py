"""Fake-quant Conv2d/Linear with stable quantizer names: ``weight_quantizer``, ``input_quantizer``.

The swap changes the class of the existing module in place, so parameters stay the same
objects and diffusers code that checks ``isinstance(m, nn.Conv2d)`` keeps working. With
``split > 0`` (Q-Diffusion's split shortcut) the input channels [split:] get their own
quantizers, ``input_quantizer_split`` and ``weight_quantizer_split``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tfmq_exp.quant.quantizer import UniformQuantizer


class QuantMixin:
    """Shared by QuantConv2d and QuantLinear."""

    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer
    split: int

    def _attach(self, wq: UniformQuantizer, aq: UniformQuantizer, split: int = 0) -> None:
        self.weight_quantizer, self.input_quantizer, self.split = wq, aq, split
        self.allow_weight_quant, self.allow_input_quant = wq.enabled, aq.enabled
        if split:
            import copy

            self.weight_quantizer_split = copy.deepcopy(wq)
            self.input_quantizer_split = copy.deepcopy(aq)

    def weight_quantizers(self) -> list[UniformQuantizer]:
        return [self.weight_quantizer] + ([self.weight_quantizer_split] if self.split else [])

    def input_quantizers(self) -> list[UniformQuantizer]:
        return [self.input_quantizer] + ([self.input_quantizer_split] if self.split else [])

    def weight_signature(self) -> tuple:
        """What the quantized weight depends on (``frozen_weights``): each tensor by identity, version and
        storage (``module.to`` swaps a parameter's data in place), and the quantizers' switches."""
        tensors = [self.weight]
        sig: list = []
        for q in self.weight_quantizers():
            tensors += [q.scale, q.zero_point] + ([] if q.alpha is None else [q.alpha])
            sig += [q.enabled, q.rounding, q.alpha is None]
        for t in tensors:
            sig += [t, t._version, t.data_ptr()]
        return tuple(sig)

    def frozen_weight(self) -> torch.Tensor | None:
        """The quantized weight ``frozen_weights`` stored, if the layer still matches it (else it is dropped)."""
        frozen = self.__dict__.get("_frozen_weight")
        if frozen is None:
            return None
        value, sig = frozen
        if all(a is b or (not isinstance(a, torch.Tensor) and a == b)
               for a, b in zip(self.weight_signature(), sig, strict=True)):
            return value
        self.__dict__["_frozen_weight"] = None
        return None

    def quantized_weight(self) -> torch.Tensor:
        frozen = self.frozen_weight()
        if frozen is not None:
            return frozen
        w = self.weight
        if not self.split:
            return self.weight_quantizer(w)
        return torch.cat(
            [self.weight_quantizer(w[:, : self.split]), self.weight_quantizer_split(w[:, self.split :])], 1
        )

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.input_quantizer(x)
        return torch.cat([self.input_quantizer(x[:, : self.split]), self.input_quantizer_split(x[:, self.split :])], 1)


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantMixin]]:
    """(name, module) of every fake-quant layer, in registration order."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantMixin):
            yield name, mod

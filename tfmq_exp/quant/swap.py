"""Apply a recipe to a model: swap layers, initialise weight ranges, calibrate activations.

``quantize(model, recipe, forward_loop)`` is the one call a user needs; methods build on the
smaller pieces (``swap_modules``, ``set_quant_state``, ``calibrate_activations``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from tfmq_exp.quant.frozen import frozen_weights
from tfmq_exp.quant.modules import QUANT_CLASSES, QuantMixin, quant_modules
from tfmq_exp.quant.quantizer import UniformQuantizer
from tfmq_exp.quant.recipe import QuantizerSpec, QuantRecipe


def _make(spec: QuantizerSpec, n_bits: int, enabled: bool) -> UniformQuantizer:
    return UniformQuantizer(n_bits, spec.per_channel, spec.init, spec.p, symmetric=spec.symmetric, enabled=enabled,
                            ema=spec.ema)


def swap_modules(model: nn.Module, recipe: QuantRecipe, splits: dict[str, int] | None = None) -> nn.Module:
    """Turn every Conv2d/Linear the rules keep into its fake-quant class, in place."""
    splits = splits or {}
    for name, mod in list(model.named_modules()):
        cls = QUANT_CLASSES.get(type(mod))
        if cls is None:
            continue
        plan = recipe.plan(name)
        if not plan.wrap:
            continue
        mod.__class__ = cls
        wq = _make(recipe.weight, plan.weight_bits, plan.quantize_weight and plan.weight_bits < 32)
        aq = _make(recipe.act, plan.act_bits, plan.quantize_input and plan.act_bits < 32)
        mod._attach(wq, aq, splits.get(name, 0))
    return model


@torch.no_grad()
def init_weight_ranges(model: nn.Module) -> None:
    """Range init of every enabled weight quantizer from the weights themselves (no data needed)."""
    from tfmq_exp.progress import progress_bar as tqdm

    for _, mod in tqdm(list(quant_modules(model)), desc="weight ranges", leave=False, mininterval=2.0):
        if mod.allow_weight_quant:
            if mod.split:
                mod.weight_quantizer.init_range(mod.weight[:, : mod.split])
                mod.weight_quantizer_split.init_range(mod.weight[:, mod.split :])
            else:
                mod.weight_quantizer.init_range(mod.weight)


def set_quant_state(model: nn.Module, weight: bool | None = None, act: bool | None = None) -> None:
    """Switch weight / activation quantization on or off, within what the rules allow."""
    for _, mod in quant_modules(model):
        if weight is not None:
            for q in mod.weight_quantizers():
                q.enabled = weight and mod.allow_weight_quant
        if act is not None:
            for q in mod.input_quantizers():
                q.enabled = act and mod.allow_input_quant


def activation_quantizers(model: nn.Module) -> Iterable[UniformQuantizer]:
    for _, mod in quant_modules(model):
        if mod.allow_input_quant:
            yield from mod.input_quantizers()


@torch.no_grad()
def calibrate_activations(
    model: nn.Module, forward_loop: Callable[[nn.Module], None], running_stat: bool = False, reset: bool = True
) -> None:
    """Run ``forward_loop(model)`` with activation quantizers observing (weights as they are set)."""
    qs = list(activation_quantizers(model))
    for q in qs:
        if reset:
            q.reset()
        q.enabled, q.observing, q.running_stat = True, True, running_stat
    try:
        with frozen_weights(model):
            forward_loop(model)
    finally:
        for q in qs:
            q.observing = q.running_stat = False
    missing = [q for q in qs if not q.initialized]
    if missing:
        raise RuntimeError(f"{len(missing)} activation quantizers saw no data during calibration")


def quantize(
    model: nn.Module,
    recipe: QuantRecipe,
    forward_loop: Callable[[nn.Module], None] | None = None,
    splits: dict[str, int] | None = None,
) -> nn.Module:
    """Round-to-nearest PTQ in one call: swap, weight ranges, activation ranges from ``forward_loop``."""
    swap_modules(model, recipe, splits)
    init_weight_ranges(model)
    if any(mod.allow_input_quant for _, mod in quant_modules(model)):
        if forward_loop is None:
            raise ValueError("activation quantization needs a forward_loop over calibration data")
        calibrate_activations(model, forward_loop)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantMixin) for m in model.modules())

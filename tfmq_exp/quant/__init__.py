"""Quantization core: pure math, fake-quant modules, module swap by rules, state I/O.

This package imports neither Hydra nor Lightning, so it can be used on its own::

    recipe = QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=True), act=QuantizerSpec(n_bits=8))
    quantize(model, recipe, forward_loop)
"""

from tfmq_exp.quant.frozen import frozen_weights
from tfmq_exp.quant.modules import QuantConv2d, QuantLinear, quant_modules
from tfmq_exp.quant.quantizer import UniformQuantizer
from tfmq_exp.quant.recipe import QuantizerSpec, QuantRecipe, QuantRule
from tfmq_exp.quant.steps import step_context
from tfmq_exp.quant.summary import quant_summary
from tfmq_exp.quant.swap import calibrate_activations, quantize, set_quant_state

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "QuantRecipe",
    "QuantRule",
    "QuantizerSpec",
    "UniformQuantizer",
    "calibrate_activations",
    "frozen_weights",
    "quant_modules",
    "quant_summary",
    "quantize",
    "set_quant_state",
    "step_context",
]

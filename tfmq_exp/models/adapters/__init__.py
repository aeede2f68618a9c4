"""Architecture adapters: one per family, one file each, behind the ``UNetAdapter`` interface (base.py).

``adapter_for(unet)`` picks the family from the model's class (or checks a named ``family`` against it);
the functions below are the same questions asked of whichever adapter fits, so callers stay family-blind.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tfmq_exp.models.adapters.base import (
    METHODS,
    UNetAdapter,
    Unit,
    block_classes,
    resnet_blocks,
)
from tfmq_exp.models.adapters.unet2d import UNet2DAdapter
from tfmq_exp.models.adapters.unet2d_condition import UNet2DConditionAdapter
from tfmq_exp.models.attention import (
    QuantAttnProcessor,
    attention_modules,
    attention_quantizers,
    install_attention_quantizers,
    set_attention_quant_state,
)
from tfmq_exp.quant.recipe import QuantRule

ADAPTERS: dict[str, type[UNetAdapter]] = {a.family: a for a in (UNet2DAdapter, UNet2DConditionAdapter)}

__all__ = [
    "ADAPTERS",
    "METHODS",
    "QuantAttnProcessor",
    "UNet2DAdapter",
    "UNet2DConditionAdapter",
    "UNetAdapter",
    "Unit",
    "adapter_for",
    "attention_modules",
    "attention_quantizers",
    "block_classes",
    "describe",
    "example_inputs",
    "fp_rules",
    "install_attention_quantizers",
    "reconstruction_units",
    "resnet_blocks",
    "set_attention_quant_state",
    "split_points",
    "temporal_layer_names",
    "tib_features",
    "tib_modules",
    "time_embedding_output",
]


def adapter_for(unet: nn.Module, family: str | None = None) -> UNetAdapter:
    """The adapter describing ``unet``; with ``family`` (``model.family``), check that it is the right one."""
    found = next((cls for cls in ADAPTERS.values() if cls.matches(unet)), None)
    if family is not None:
        if family not in ADAPTERS:
            raise ValueError(f"unknown architecture family '{family}' (known: {sorted(ADAPTERS)})")
        if found is not ADAPTERS[family]:
            raise ValueError(f"model.family={family} but the model is a {type(unet).__name__}; "
                             f"set model.family={found.family if found else '?'}")
        return ADAPTERS[family](unet)
    if found is None:
        raise NotImplementedError(f"no architecture adapter for {type(unet).__name__} "
                                  f"(known families: {sorted(ADAPTERS)})")
    return found(unet)


def tib_modules(unet: nn.Module) -> dict[str, nn.Module]:
    return adapter_for(unet).tib_modules()


def reconstruction_units(unet: nn.Module, order: str = "registration",
                         example: dict[str, Any] | None = None) -> list[Unit]:
    return adapter_for(unet).reconstruction_units(order, example)


def example_inputs(unet: nn.Module, batch_size: int = 1) -> dict[str, Any]:
    return adapter_for(unet).example_inputs(batch_size)


def temporal_layer_names(unet: nn.Module) -> list[str]:
    return adapter_for(unet).temporal_layer_names()


def time_embedding_output(unet: nn.Module, timesteps: Any, class_labels: torch.Tensor | None = None,
                          timestep_cond: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
    return adapter_for(unet).time_embedding_output(timesteps, class_labels, timestep_cond, batch_size)


def tib_features(unet: nn.Module, timesteps: Any, class_labels: torch.Tensor | None = None,
                 timestep_cond: torch.Tensor | None = None, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    return adapter_for(unet).tib_features(timesteps, class_labels, timestep_cond, batch_size)


def fp_rules(unet: nn.Module, method: str, brecq_8bit_head_stem: bool = False,
             tfmq_attention_fp: bool = True) -> list[QuantRule]:
    return adapter_for(unet).fp_rules(method, brecq_8bit_head_stem, tfmq_attention_fp)


def split_points(unet: nn.Module) -> dict[str, int]:
    return adapter_for(unet).split_points()


def describe(unet: nn.Module) -> dict[str, Any]:
    return adapter_for(unet).describe()

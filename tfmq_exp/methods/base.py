"""What a method receives and returns, and the registry ``quantizer.name`` selects from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tfmq_exp.diffusion.calib_pool import CalibRecord, call_model
from tfmq_exp.errors import UserError
from tfmq_exp.quant.recipe import QuantizerSpec, QuantRecipe, QuantRule


@dataclass
class MethodContext:
    """Everything a method may use: the FP model (never modified), its calibration record, configs."""

    fp_unet: nn.Module
    record: CalibRecord | None
    quantizer: Any  # cfg.quantizer
    calib: Any  # cfg.calib
    recon: Any  # cfg.recon
    trainer: Any  # cfg.trainer
    seed: int
    family: str | None = None  # model.family: checked against the model; None = inferred from its class
    origin: str = "ddim"  # the original code base's conventions: ddim | ldm | sd (model.origin)
    checkpoint: Any = None  # tfmq_exp.recon.resume.UnitCheckpoint: resume from the last finished unit


@dataclass
class MethodResult:
    model: nn.Module
    recipe: QuantRecipe | None
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def build_recipe(q: Any) -> QuantRecipe:
    """QuantRecipe from the ``quantizer`` config group (bits already merged in by ``bits=``)."""
    from tfmq_exp.quant.recipe import ALLOWED_BITS

    for side in ("weight", "act"):
        n = int(q[side].n_bits)
        if n not in ALLOWED_BITS:
            raise UserError(f"quantizer.{side}.n_bits={n} is not supported. Fix: use one of {list(ALLOWED_BITS)}.")

    def spec(s: Any) -> QuantizerSpec:
        return QuantizerSpec(
            n_bits=int(s.n_bits),
            per_channel=bool(s.per_channel),
            init=str(s.init),
            p=float(s.p),
            symmetric=bool(s.symmetric),
            enabled=int(s.n_bits) < 32,
            ema=str(s.get("ema", "zero_forced")),
        )

    rules = [QuantRule(**{k: v for k, v in dict(r).items()}) for r in q.get("rules", [])]
    return QuantRecipe(weight=spec(q.weight), act=spec(q.act), rules=rules)


METHODS: dict[str, Callable[[MethodContext], MethodResult]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable[[MethodContext], MethodResult]) -> Callable[[MethodContext], MethodResult]:
        METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Callable[[MethodContext], MethodResult]:
    import tfmq_exp.methods.reconstruction  # noqa: F401  (registers brecq, qdiff, tfmq)
    import tfmq_exp.methods.reference  # noqa: F401  (registers fp, rtn)

    if name not in METHODS:
        raise UserError(f"unknown quantizer '{name}'. Fix: use quantizer={' | '.join(sorted(METHODS))}.")
    return METHODS[name]


def forward_pool(model: nn.Module, pool: Any, batch_size: int) -> None:
    """Run the model over a calibration pool (no grad), batch by batch."""
    with torch.no_grad():
        for batch in pool.batches(batch_size):
            call_model(model, batch)

"""The two reference points of every table: full precision and round-to-nearest."""

from __future__ import annotations

import copy
import time

from tfmq_exp.methods.base import MethodContext, MethodResult, build_recipe, forward_pool, register
from tfmq_exp.quant.swap import calibrate_activations, init_weight_ranges, swap_modules


@register("fp")
def full_precision(ctx: MethodContext) -> MethodResult:
    return MethodResult(model=ctx.fp_unet, recipe=None, timings={"weight_stage_s": 0.0, "act_stage_s": 0.0})


@register("rtn")
def round_to_nearest(ctx: MethodContext) -> MethodResult:
    """Weights: per-channel Lp-searched ranges, nearest rounding. Activations: ranges set on one
    shuffled batch of ``quantizer.act_calib_samples`` pool samples (all steps mixed)."""
    recipe = build_recipe(ctx.quantizer)
    model = copy.deepcopy(ctx.fp_unet)
    t0 = time.perf_counter()
    swap_modules(model, recipe)
    init_weight_ranges(model)
    t1 = time.perf_counter()
    if recipe.act.enabled:
        pool = ctx.record.pool(ctx.calib.step_every, ctx.calib.per_step)
        batch = pool.shuffled(int(ctx.quantizer.act_calib_samples), ctx.seed)
        calibrate_activations(model, lambda m: forward_pool(m, batch, len(batch)))
    t2 = time.perf_counter()
    return MethodResult(model=model, recipe=recipe, timings={"weight_stage_s": t1 - t0, "act_stage_s": t2 - t1})

"""BRECQ, Q-Diffusion and TFMQ-DM as recipes over the core, the adapter and the engine.

Each follows docs/methods.md: weight stage (AdaRound, activations off) first, then the
activation stage (LSQ for BRECQ and Q-Diffusion; per-step EMA tables for TFMQ-DM).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from tfmq_exp.errors import UserError
from tfmq_exp.methods.base import MethodContext, MethodResult, build_recipe, register
from tfmq_exp.methods.pipeline import (
    all_act_quantizers,
    fsc_stage,
    init_activations,
    lsq_stage,
    runner_from,
    set_quant_state,
    settings_from,
    tiar_stage,
    weight_stage,
)
from tfmq_exp.models import adapters
from tfmq_exp.quant.modules import quant_modules
from tfmq_exp.quant.swap import init_weight_ranges, swap_modules
from tfmq_exp.recon.capture import FPCache


def _opt(ctx: MethodContext, key: str, default: Any) -> Any:
    return ctx.quantizer.get("options", {}).get(key, default)


def pool_steps(num_steps: int, calib_steps: int) -> list[int]:
    """The official step selection ``range(0, N, N // calib_steps)`` (QD's cali_st; TFMQ's interval_length
    N // calib_steps): 17 steps for N=50, calib_steps=16; every step when calib_steps >= N."""
    return list(range(0, num_steps, max(1, num_steps // max(1, calib_steps))))


def weight_pool(ctx: MethodContext):  # noqa: ANN201
    """The shared pool: the ``pool_steps`` x (pool_size // calib_steps) samples of each (QD's cali_n).

    The size is ``recon.pool_size`` times the method recipe's ``options.pool_size_factor`` (default 1; SD:
    TFMQ-DM and BRECQ keep all 50 steps where Q-Diffusion keeps 25, so their recipes double the pool and the
    same per-step count results at any budget). With guidance every trajectory gives two entries per step
    (c and uc), so a step holds twice ``calib.n_trajectories``.
    """
    rec = ctx.record
    calib_steps = int(_opt(ctx, "calib_steps", 16))
    chosen = pool_steps(rec.num_steps, calib_steps)
    size = round(int(ctx.recon.pool_size) * float(_opt(ctx, "pool_size_factor", 1)))
    per_step = max(1, size // min(calib_steps, rec.num_steps))
    if per_step > rec.entries_per_step:
        guided = " (trajectories x {c, uc})" if rec.guided else ""
        raise UserError(
            f"a weight pool of {size} needs {per_step} samples per step but the calibration record has "
            f"{rec.entries_per_step}{guided}. Fix: raise calib.n_trajectories or lower recon.pool_size."
        )
    return rec.pool(steps=chosen, per_step=per_step)


@dataclass
class Setup:
    """What every reconstruction method starts from: the swapped model on the compute device."""

    qmodel: torch.nn.Module
    fp: torch.nn.Module
    recipe: Any
    pool: Any
    settings: Any
    runner: Any


def _prepare(ctx: MethodContext, method: str, split: bool, quant_attention: bool) -> Setup:
    """Swap with the method's FP rules, initialise weight ranges, add attention quantizers, place on device."""
    recipe = build_recipe(ctx.quantizer)
    try:
        adapter = adapters.adapter_for(ctx.fp_unet, ctx.family)
    except (ValueError, NotImplementedError) as err:
        raise UserError(f"{err}. Fix: quantize a supported diffusers UNet with the matching model.family.") from None
    recipe.rules = adapter.fp_rules(method, **_rule_options(ctx, method)) + recipe.rules
    qmodel = copy.deepcopy(ctx.fp_unet)
    splits = adapters.split_points(qmodel) if split else {}
    swap_modules(qmodel, recipe, splits)
    init_weight_ranges(qmodel)
    if recipe.act.enabled and bool(_opt(ctx, "quant_attention", quant_attention)):
        a = recipe.act
        adapters.install_attention_quantizers(
            qmodel, a.n_bits, int(_opt(ctx, "softmax_bits", 8)), False, init=a.init, symmetric=a.symmetric,
            softmax_always_zero=ctx.origin != "ddim", ema=a.ema,
        )
    if ctx.checkpoint is not None:
        ctx.checkpoint.restore(qmodel)  # the roundings of the units a killed run finished
    runner = runner_from(ctx.trainer)
    return Setup(qmodel.to(runner.device), ctx.fp_unet.to(runner.device), recipe, weight_pool(ctx),
                 settings_from(ctx.recon), runner)


def _auto(value: Any, default: bool) -> bool:
    """A method switch that may be 'auto' (decided by the model's origin)."""
    return default if str(value) == "auto" else bool(value)


def _rule_options(ctx: MethodContext, method: str) -> dict[str, Any]:
    if method == "brecq":
        return {"brecq_8bit_head_stem": bool(_opt(ctx, "head_stem_8bit", False))}
    if method == "tfmq":
        # TFMQ wraps no Conv1d: LDM attention qkv/proj_out stay FP; DDIM's AttnBlock uses 1x1 Conv2d (wrapped)
        return {"tfmq_attention_fp": _auto(_opt(ctx, "attention_fp", "auto"), ctx.origin == "ldm")}
    return {}


def units_of(ctx: MethodContext, qmodel: torch.nn.Module) -> list[adapters.Unit]:
    """Reconstruction units of the quantized model, in forward order by default (``options.unit_order``).

    diffusers registers mid_block after the up blocks and attentions before resnets, so its
    registration order is not the forward order the LDM code's registration order follows.
    """
    order = str(_opt(ctx, "unit_order", "forward"))
    if order not in ("forward", "registration"):
        raise UserError(f"quantizer.options.unit_order={order} is unknown. Fix: use 'forward' or 'registration'.")
    names = [(u.name, u.kind) for u in adapters.reconstruction_units(ctx.fp_unet, order=order)]
    mods = dict(qmodel.named_modules())
    return [adapters.Unit(n, mods[n], k) for n, k in names]


def _layer_units(qmodel: torch.nn.Module, names: list[str]) -> list[adapters.Unit]:
    mods = dict(qmodel.named_modules())
    return [adapters.Unit(n, mods[n], "layer") for n in names if n in mods]


def _lsq_method(ctx: MethodContext, method: str) -> MethodResult:
    """BRECQ (§3.2) and Q-Diffusion (§4): AdaRound blocks, then LSQ on activation steps."""
    t0 = time.perf_counter()
    # QD's DDIM and SD scripts split the up-block shortcuts; its LDM script has no split option (§4.2)
    split = method == "qdiff" and _auto(_opt(ctx, "split_shortcut", "auto"), ctx.origin != "ldm")
    su = _prepare(ctx, method, split, quant_attention=method == "qdiff")
    qmodel, fp, recipe, pool, s, runner = su.qmodel, su.fp, su.recipe, su.pool, su.settings, su.runner
    # Q-Diffusion also reconstructs the time-embedding MLP, as single layers, before the blocks (§2)
    temb = [n for n in adapters.temporal_layer_names(qmodel) if not n.endswith("time_emb_proj")]
    units = _layer_units(qmodel, temb) + units_of(ctx, qmodel)
    if method == "brecq" and bool(_opt(ctx, "head_stem_8bit", False)):
        units = [u for u in units if u.name != "conv_in"]  # BRECQ keeps its 8-bit first layer as rounded (§3.1)
    # the LSQ stage needs each unit's FP inputs and targets: the weight stage's FP pass captures both and keeps
    # them (within recon.keep_fp_gb), so the LSQ stage recaptures only what did not fit
    lsq = recipe.act.enabled and bool(_opt(ctx, "lsq", True)) and s.act_iters > 0
    kept = FPCache(float(ctx.recon.get("keep_fp_gb", 4.0)) * 2**30) if lsq else None
    reports = weight_stage(qmodel, fp, units, pool, s, runner, ctx.seed, cache_on=str(ctx.recon.cache_on),
                           checkpoint=ctx.checkpoint, keep_fp=kept)
    t1 = time.perf_counter()
    if recipe.act.enabled:
        init_activations(qmodel, pool, int(ctx.quantizer.act_calib_samples), ctx.seed,
                         bool(_opt(ctx, "running_stat", False)), int(_opt(ctx, "running_stat_batch", 64)),
                         order=str(_opt(ctx, "act_init_order", "random")),
                         stat_order=str(_opt(ctx, "running_stat_order", "shuffled")))
        if lsq:
            reports += lsq_stage(qmodel, fp, units, pool, s, runner, ctx.seed, cache_on=str(ctx.recon.cache_on),
                                 kept=kept)  # takes (and so releases) every kept unit
    set_quant_state(qmodel, weight=True, act=recipe.act.enabled)
    t2 = time.perf_counter()
    qmodel.cpu()
    ctx.fp_unet.cpu()
    info = {"units": reports, "pool_size": len(pool), "pool_steps": sorted(set(pool.step.tolist()))}
    return MethodResult(qmodel, recipe, {"weight_stage_s": t1 - t0, "act_stage_s": t2 - t1}, info)


@register("brecq")
def brecq(ctx: MethodContext) -> MethodResult:
    return _lsq_method(ctx, "brecq")


@register("qdiff")
def qdiff(ctx: MethodContext) -> MethodResult:
    return _lsq_method(ctx, "qdiff")


@register("tfmq")
def tfmq(ctx: MethodContext) -> MethodResult:
    """TFMQ-DM (§5): TIAR on the TIB, AdaRound of the data blocks without the temporal projections,
    then FSC per-step activation tables (scope 'all' as the official code, or 'tib' as the paper).

    Ablations: ``options.tiar=false`` reconstructs the temporal layers as the baselines do (the time MLP as
    single layers first, each ``time_emb_proj`` inside its block); ``options.fsc_scope=none`` gives every
    activation quantizer one range over all steps (Lp init, then the EMA over the whole pool), no tables.
    """
    t0 = time.perf_counter()
    su = _prepare(ctx, "tfmq", split=False, quant_attention=False)
    qmodel, fp, recipe, pool, s, runner = su.qmodel, su.fp, su.recipe, su.pool, su.settings, su.runner
    temporal = adapters.temporal_layer_names(qmodel)
    units = units_of(ctx, qmodel)
    ckpt = ctx.checkpoint
    if bool(_opt(ctx, "tiar", True)):
        tib = "temporal_information_block"
        if ckpt is not None and tib in ckpt.done:
            reports = [ckpt.done[tib]]
        else:
            reports = [tiar_stage(qmodel, fp, temporal, pool.t, s, runner, ctx.seed, adapters.tib_features)]
            if ckpt is not None and runner.is_main:
                ckpt.record(qmodel, tib, reports[0])
        reports += weight_stage(qmodel, fp, units, pool, s, runner, ctx.seed, exclude=set(temporal),
                                cache_on=str(ctx.recon.cache_on), checkpoint=ckpt)
    else:
        temb = [n for n in temporal if not n.endswith("time_emb_proj")]
        reports = weight_stage(qmodel, fp, _layer_units(qmodel, temb) + units, pool, s, runner, ctx.seed,
                               cache_on=str(ctx.recon.cache_on), checkpoint=ckpt)
    t1 = time.perf_counter()
    info: dict[str, Any] = {"pool_size": len(pool), "pool_steps": sorted(set(pool.step.tolist()))}
    if recipe.act.enabled:
        scope = str(_opt(ctx, "fsc_scope", "all"))
        if scope not in ("all", "tib", "none"):
            raise UserError(f"quantizer.options.fsc_scope={scope} is unknown. Fix: use 'all' (official code), 'tib' "
                            "(the paper) or 'none' (one range per quantizer, the ablation).")
        rec = ctx.record
        per_step = int(_opt(ctx, "fsc_per_step", 256))
        by_step = {k: rec.pool(steps=[k], per_step=per_step) for k in range(rec.num_steps)}
        every = all_act_quantizers(qmodel)
        if scope == "none":
            init_activations(qmodel, rec.pool(1, per_step), int(_opt(ctx, "fsc_init_samples", 16)), ctx.seed, True,
                             int(_opt(ctx, "fsc_batch_size", 16)))
            table_qs = []
        elif scope == "tib":
            names = set(temporal)
            mods = dict(quant_modules(qmodel))
            table_qs = [q for n in names if n in mods and mods[n].allow_input_quant for q in mods[n].input_quantizers()]
            full = rec.pool(1, per_step)
            init_activations(qmodel, full, int(_opt(ctx, "fsc_init_samples", 16)), ctx.seed, True,
                             int(_opt(ctx, "fsc_batch_size", 16)))
        else:
            table_qs = every
        if table_qs:
            info.update(fsc_stage(qmodel, by_step, rec.num_steps, table_qs, int(_opt(ctx, "fsc_init_samples", 16)),
                                  int(_opt(ctx, "fsc_batch_size", 16)), float(_opt(ctx, "fsc_momentum", 0.95)),
                                  ctx.seed, max_batch=int(_opt(ctx, "fsc_max_batch", 1))))
        info["fsc_scope"] = scope
    info["tiar"] = bool(_opt(ctx, "tiar", True))
    set_quant_state(qmodel, weight=True, act=recipe.act.enabled)
    t2 = time.perf_counter()
    qmodel.cpu()
    ctx.fp_unet.cpu()
    info["units"] = reports
    return MethodResult(qmodel, recipe, {"weight_stage_s": t1 - t0, "act_stage_s": t2 - t1}, info)

"""Stages shared by BRECQ, Q-Diffusion and TFMQ-DM (docs/methods.md §1.4-1.5, §5.4-5.6).

* ``weight_stage``: AdaRound each unit in registration order; inputs from the partially
  quantized model (asym), targets from the FP model; activations off.
* ``lsq_stage``: activation step learning per unit; inputs and targets from the FP model.
* ``tiar_stage``: AdaRound of the Temporal Information Block on its own features.
* ``fsc_stage``: per-step activation tables from EMA min/max on each step's samples.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tfmq_exp.checks import require_finite
from tfmq_exp.diffusion.calib_pool import Batch, CalibPool, call_model
from tfmq_exp.progress import progress_bar as tqdm
from tfmq_exp.quant.frozen import frozen_weights
from tfmq_exp.quant.modules import QuantMixin, quant_modules
from tfmq_exp.quant.quantizer import UniformQuantizer
from tfmq_exp.quant.steps import step_context
from tfmq_exp.quant.swap import activation_quantizers
from tfmq_exp.quant.swap import set_quant_state as _set_layers
from tfmq_exp.recon.capture import FPCache, capture_inputs, capture_io, capture_outputs, to_float32
from tfmq_exp.recon.engine import FabricRunner, ReconSettings, lp_loss, optimize_rounding, optimize_steps

log = logging.getLogger("tfmq_exp")


def set_quant_state(model: nn.Module, weight: bool | None = None, act: bool | None = None) -> None:
    """Layer quantizers as the rules allow, plus attention-matmul quantizers where installed."""
    from tfmq_exp.models.attention import set_attention_quant_state

    _set_layers(model, weight, act)
    if act is not None:
        set_attention_quant_state(model, act)


def all_act_quantizers(model: nn.Module) -> list[UniformQuantizer]:
    from tfmq_exp.models.attention import attention_quantizers

    return list(activation_quantizers(model)) + list(attention_quantizers(model).values())


def unit_act_quantizers(module: nn.Module) -> list[UniformQuantizer]:
    """The activation quantizers inside a unit, by role: layer inputs (split halves included) and
    attention matmul operands. Weight quantizers are never among them, per-tensor or not."""
    from tfmq_exp.models.attention import QuantAttnProcessor

    layers = [m for m in module.modules() if isinstance(m, QuantMixin)]
    acts = [q for m in layers if m.allow_input_quant for q in m.input_quantizers()]
    return acts + [q for m in module.modules() if isinstance(m, QuantAttnProcessor) for q in m.quantizers()]


def settings_from(recon: Any) -> ReconSettings:
    return ReconSettings(
        iters=int(recon.iters), batch_size=int(recon.batch_size), lr=float(recon.weight_lr),
        reg_weight=float(recon.reg_weight), warmup=float(recon.warmup), beta_start=float(recon.beta_start),
        beta_end=float(recon.beta_end), act_iters=int(recon.act_iters), act_lr=float(recon.act_lr),
        fp_precision=str(recon.get("fp_precision", "f32")),
    )


FP_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def fp_pass(s: ReconSettings, dev: torch.device, capture: Any, *args: Any, **kwargs: Any) -> Any:
    """``capture(*args, **kwargs)`` on the FP model (unit targets, kept FP inputs, TIAR's targets) under
    ``recon.fp_precision``: f32 as the official code, or autocast to bf16 / f16 with what it captured stored
    back in float32."""
    dtype = FP_DTYPES.get(s.fp_precision)
    if dtype is None:
        return capture(*args, **kwargs)
    with torch.autocast(device_type=dev.type, dtype=dtype):
        return to_float32(capture(*args, **kwargs))


def runner_from(trainer: Any) -> FabricRunner:
    return FabricRunner(trainer.accelerator, trainer.devices, trainer.strategy, trainer.precision, trainer.num_nodes)


def _storage(runner: FabricRunner, cache_on: str) -> torch.device | str:
    if cache_on not in ("device", "host"):
        raise ValueError(f"recon.cache_on={cache_on}: use 'device' or 'host'")
    return runner.device if cache_on == "device" else "cpu"


def _on(pool: CalibPool, device: torch.device) -> CalibPool:
    return pool.to(device)


def _run(model: nn.Module, batch: Batch) -> Any:
    return call_model(model, batch)


def _call(unit: nn.Module, args: list, kwargs: dict) -> torch.Tensor:
    out = unit(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def weight_quantizers_of(layers: list[QuantMixin]) -> list[UniformQuantizer]:
    """Enable AdaRound on the layers' weight quantizers (split halves separately)."""
    qs = []
    for layer in layers:
        if not layer.allow_weight_quant:
            continue
        w = layer.weight.detach()
        if layer.split:
            layer.weight_quantizer.enable_adaround(w[:, : layer.split])
            layer.weight_quantizer_split.enable_adaround(w[:, layer.split :])
            qs += [layer.weight_quantizer, layer.weight_quantizer_split]
        else:
            layer.weight_quantizer.enable_adaround(w)
            qs.append(layer.weight_quantizer)
    return qs


def weight_stage(
    qmodel: nn.Module, fp_model: nn.Module, units: list[Any], pool: CalibPool, s: ReconSettings,
    runner: FabricRunner, seed: int, exclude: set[str] = frozenset(), cache_batch: int = 32,
    cache_on: str = "device", checkpoint: Any = None, keep_fp: FPCache | None = None,
) -> list[dict[str, Any]]:
    """AdaRound every unit; layers in ``exclude`` keep their current rounding (e.g. TIAR's).

    ``cache_on``: keep a unit's cached inputs/targets on the compute device ("device", fast) or in
    host memory ("host", copied per mini-batch: Q-Diffusion's policy, for caches that do not fit).
    ``checkpoint`` (a ``UnitCheckpoint``): units it has finished are skipped (their roundings were
    restored into ``qmodel``), and each unit finished here is recorded.
    ``keep_fp``: the pass that captures a unit's FP targets also captures its FP inputs, and both are kept
    there (within its budget) for an activation stage that needs them.
    """
    set_quant_state(qmodel, weight=True, act=False)
    fp_modules = dict(fp_model.named_modules())
    reports = []
    dev = runner.device
    for i, unit in enumerate(tqdm(units, desc="weight stage (units)", mininterval=2.0)):
        if checkpoint is not None and unit.name in checkpoint.done:
            reports.append(checkpoint.done[unit.name])
            continue
        layers = [m for n, m in quant_modules(unit.module) if f"{unit.name}.{n}".rstrip(".") not in exclude]
        if isinstance(unit.module, QuantMixin) and unit.name not in exclude:
            layers = [unit.module]
        layers = [m for m in layers if m.allow_weight_quant]
        if not layers:
            continue
        store = _storage(runner, cache_on)
        with frozen_weights(qmodel):  # no rounding is learned while the quantized model's inputs are captured
            inputs = capture_inputs(qmodel, unit.module, _on(pool, dev).batches(cache_batch), _run, store,
                                    desc=f"inputs of {unit.name}")
        fp_batches = _on(pool, dev).batches(cache_batch)
        if keep_fp is None:
            targets = fp_pass(s, dev, capture_outputs, fp_model, fp_modules[unit.name], fp_batches, _run, store,
                              desc=f"targets of {unit.name}")
        else:
            fp_inputs, targets = fp_pass(s, dev, capture_io, fp_model, fp_modules[unit.name], fp_batches, _run,
                                         store, desc=f"targets of {unit.name}")
            keep_fp.offer(unit.name, fp_inputs, targets)
            del fp_inputs

        def loss_fn(idx: torch.Tensor, unit=unit, inputs=inputs, targets=targets) -> torch.Tensor:
            args, kwargs = inputs.select(idx, dev)
            return lp_loss(_call(unit.module, args, kwargs), targets[idx.to(targets.device)])

        qs = weight_quantizers_of(layers)
        rep = optimize_rounding(qs, loss_fn, inputs.n, s, runner, seed + i, desc=f"adaround {unit.name}")
        reports.append({"unit": unit.name, "kind": unit.kind, "stage": "weight", **rep})
        log.info("unit %-40s loss %.4g -> %.4g (%.1f s)", unit.name, rep["loss_before"], rep["loss_after"],
                 rep["wall_s"])
        if checkpoint is not None and runner.is_main:
            checkpoint.record(qmodel, unit.name, reports[-1])
    return reports


def lsq_stage(
    qmodel: nn.Module, fp_model: nn.Module, units: list[Any], pool: CalibPool, s: ReconSettings,
    runner: FabricRunner, seed: int, cache_batch: int = 32, skip_bits: int = 16, cache_on: str = "device",
    kept: FPCache | None = None,
) -> list[dict[str, Any]]:
    """LSQ per unit with FP inputs and targets (asym=False); quantizers at >= skip_bits stay fixed.

    A unit's FP inputs and targets come from ``kept`` (the weight stage's capture) when there, else from one
    capture pass of the FP model."""
    set_quant_state(qmodel, weight=True, act=True)
    fp_modules = dict(fp_model.named_modules())
    dev = runner.device
    reports = []
    with frozen_weights(qmodel):  # every rounding is final: the weights are quantized once
        for i, unit in enumerate(tqdm(units, desc="activation stage (units)", mininterval=2.0)):
            got = kept.take(unit.name) if kept is not None else None
            qs = [q for q in unit_act_quantizers(unit.module) if q.enabled and q.initialized and q.n_bits < skip_bits]
            if not qs:
                continue
            if got is None:
                got = fp_pass(s, dev, capture_io, fp_model, fp_modules[unit.name], _on(pool, dev).batches(cache_batch),
                              _run, _storage(runner, cache_on), desc=f"FP inputs and targets of {unit.name}")
            inputs, targets = got
            del got

            def loss_fn(idx: torch.Tensor, unit=unit, inputs=inputs, targets=targets) -> torch.Tensor:
                args, kwargs = inputs.select(idx, dev)
                return lp_loss(_call(unit.module, args, kwargs), targets[idx.to(targets.device)], p=s.act_p)

            rep = optimize_steps(qs, loss_fn, inputs.n, s, runner, seed + i, desc=f"lsq {unit.name}")
            reports.append({"unit": unit.name, "kind": unit.kind, "stage": "act", **rep})
    return reports


def tiar_stage(
    qmodel: nn.Module, fp_model: nn.Module, temporal: list[str], t: torch.Tensor, s: ReconSettings,
    runner: FabricRunner, seed: int, tib_features: Any,
) -> dict[str, Any]:
    """TIAR: AdaRound the TIB Linears on L = sum_i mean_b ||E^_i(t) - E_i(t)||^2 + lambda f_reg (§5.4)."""
    set_quant_state(qmodel, weight=True, act=False)
    modules = dict(qmodel.named_modules())
    layers = [modules[n] for n in temporal if isinstance(modules.get(n), QuantMixin) and modules[n].allow_weight_quant]
    with torch.no_grad():
        targets = {k: v.to(runner.device) for k, v in fp_pass(s, runner.device, tib_features, fp_model, t).items()}
    t_dev = t.to(runner.device)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        feats = tib_features(qmodel, t_dev[idx])
        return sum(lp_loss(feats[k], targets[k][idx]) for k in targets)

    qs = weight_quantizers_of(layers)
    rep = optimize_rounding(qs, loss_fn, int(t.shape[0]), s, runner, seed, desc="TIAR")
    log.info("TIAR over %d layers: loss %.4g -> %.4g (%.1f s)", len(layers), rep["loss_before"], rep["loss_after"],
             rep["wall_s"])
    # the finite set TIAR trained on: the pool's time steps, taken from the schedule the sampler ran
    return {"unit": "temporal_information_block", "kind": "tib", "stage": "weight",
            "timesteps": sorted({int(v) for v in t.tolist()}), **rep}


@torch.no_grad()
def init_activations(
    qmodel: nn.Module, pool: CalibPool, n_init: int, seed: int, running_stat: bool, batch_size: int,
    order: str = "random", stat_order: str = "shuffled",
) -> None:
    """Activation ranges: init (each quantizer's ``init`` rule) on ``n_init`` pool samples, then an optional
    EMA over the whole pool in batches of ``batch_size``.

    ``order``: "random" samples (QD's DDIM and SD scripts) or the "first" ones (its LDM script: all from the
    first selected step, §9 Q2). ``stat_order``: "shuffled" batches (SD) or "sequential" in time order (LDM).
    """
    if order not in ("random", "first") or stat_order not in ("shuffled", "sequential"):
        raise ValueError(f"activation init order '{order}'/'{stat_order}': use random|first and shuffled|sequential")
    qs = all_act_quantizers(qmodel)
    set_quant_state(qmodel, weight=True, act=True)
    for q in qs:
        q.reset()
        q.observing, q.running_stat = True, False
    dev = next(qmodel.parameters()).device
    first = pool.shuffled(n_init, seed) if order == "random" else pool.subset(torch.arange(min(n_init, len(pool))))
    with frozen_weights(qmodel):
        call_model(qmodel, first.to(dev).all())
        if running_stat:
            for q in qs:
                q.running_stat = True
            stream = pool.shuffled(None, seed + 1) if stat_order == "shuffled" else pool
            for b in stream.to(dev).batches(batch_size):
                call_model(qmodel, b)
    for j, q in enumerate(qs):
        q.observing = q.running_stat = False
        if q.initialized:
            require_finite(q.scale, f"activation range {j} of {len(qs)} after its calibration",
                           "the calibration pool or the quantized weights hold non-finite values")


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    ctx = None if batches[0].ctx is None else torch.cat([b.ctx for b in batches])
    return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("x", "t", "step")), ctx)


@torch.no_grad()
def fsc_stage(
    qmodel: nn.Module, record_pool_by_step: dict[int, CalibPool], n_steps: int, quantizers: list[UniformQuantizer],
    init_samples: int, batch_size: int, momentum: float, seed: int, max_batch: int = 1,
) -> dict[str, Any]:
    """Per-step activation tables (FSC, §5.6), in the official order. For each step s, with every weight
    hard-rounded and every activation quantizer on:

    1. forget the ranges; forward ``init_samples`` random samples of step s: each quantizer initialises by
       its ``init`` rule (Lp search) on what it sees and fake-quantizes it, so downstream quantizers
       initialise on quantized inputs;
    2. running statistics on: forward all samples of step s in shuffled mini-batches of ``batch_size``;
       each batch moves the raw extremes by the EMA (``momentum``) and resets (scale, z) to their min-max;
    3. table[s] = (scale, z) of every quantizer.

    Each step's procedure is independent of the others', so with ``max_batch`` > ``batch_size`` several
    steps run in one forward (up to ``max_batch`` samples): their init samples together, then the k-th
    mini-batch of each, every quantizer keeping one range per step slice. The tables equal the one-step-
    at-a-time procedure's up to the float rounding of larger batches (tests/methods/test_fsc_batched.py).
    """
    set_quant_state(qmodel, weight=True, act=True)
    dev = next(qmodel.parameters()).device
    scales: list[list[torch.Tensor]] = [[] for _ in quantizers]
    zps: list[list[torch.Tensor]] = [[] for _ in quantizers]
    for q in quantizers:
        q.set_step_tables(torch.empty(0), torch.empty(0))
        q.momentum = momentum
    sizes = {len(record_pool_by_step[s]) for s in range(n_steps)}
    per_forward = max(1, max_batch // max(1, min(batch_size, min(sizes)))) if len(sizes) == 1 else 1
    chunks = [list(range(a, min(a + per_forward, n_steps))) for a in range(0, n_steps, per_forward)]
    bar = tqdm(total=n_steps, desc="FSC steps", leave=False, mininterval=2.0)
    for chunk in chunks:
        for q in quantizers:
            q.reset()
            q.observing, q.running_stat = True, False
            q.groups = len(chunk) if len(chunk) > 1 else 0
        firsts = [record_pool_by_step[s].shuffled(init_samples, seed * 7919 + s) for s in chunk]
        rest = [list(record_pool_by_step[s].shuffled(None, seed * 7919 + s + 1).to(dev).batches(batch_size))
                for s in chunk]
        try:
            # one step alone runs under its step index; several steps in one forward concatenate the k-th
            # mini-batch of each (quantizers in grouped mode keep one range per step slice)
            with step_context(chunk[0] if len(chunk) == 1 else None), frozen_weights(qmodel):
                call_model(qmodel, _concat([f.to(dev).all() for f in firsts]))
                for q in quantizers:
                    q.running_stat = True
                for k in range(len(rest[0])):
                    call_model(qmodel, _concat([r[k] for r in rest]))
        finally:
            for q in quantizers:
                q.groups = 0
        for j, q in enumerate(quantizers):
            s_vec, z_vec = q.scale.detach().clone(), q.zero_point.detach().clone()
            scales[j] += list(s_vec.reshape(len(chunk))) if len(chunk) > 1 else [s_vec]
            zps[j] += list(z_vec.reshape(len(chunk))) if len(chunk) > 1 else [z_vec]
        bar.update(len(chunk))
    bar.close()
    for j, q in enumerate(quantizers):
        q.observing = q.running_stat = False
        table = torch.stack(scales[j])
        require_finite(table, f"FSC table of activation quantizer {j} of {len(quantizers)}",
                       "the calibration pool or the quantized weights hold non-finite values")
        q.set_step_tables(table, torch.stack(zps[j]))
        q.reset()
    return {"fsc_steps": n_steps, "fsc_quantizers": len(quantizers)}

"""task=export: a quantized checkpoint -> packed checkpoint, size/BOPs report, OpenVINO IR that runs in int8.

Writes into the run folder: ``packed.safetensors``, ``model.xml/.bin`` (with
``export.step_tables=per_step`` also ``step_ranges.npz``: the quantize ranges of every distinct step
table, set into the one IR before compiling that step's model), ``export.json`` (what
``backend=openvino`` reads) and ``results.json`` (sizes, BOPs, executed precisions, agreement with
the fake-quant model).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tfmq_exp.errors import UserError
from tfmq_exp.results import write_json
from tfmq_exp.tasks.common import build_sampler, image_shape, seed_everything

log = logging.getLogger("tfmq_exp")


def load_for_export(cfg: DictConfig, ckpt: str) -> tuple[Any, dict[str, Any]]:
    """The quantized model of a plain or packed checkpoint (packed ones are unpacked to a temporary file)."""
    from tfmq_exp.export.packing import is_packed, unpack
    from tfmq_exp.tasks.sample import load_checkpoint_model

    p = Path(ckpt).expanduser()
    try:
        packed = p.is_file() and is_packed(p)
    except Exception:  # noqa: BLE001  (not safetensors: load_checkpoint_model words the error)
        packed = False
    if not packed:
        return load_checkpoint_model(cfg, str(p))
    from safetensors.torch import save_file

    state, md = unpack(p)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "quantized.safetensors"
        save_file(state, str(plain), metadata=md)
        return load_checkpoint_model(cfg, str(plain))


def run_export(cfg: DictConfig, out: Path) -> dict[str, Any]:
    from tfmq_exp.export import openvino_backend as ovb

    ovb.require_openvino()
    if not cfg.ckpt:
        raise UserError("task=export needs a quantized checkpoint. Fix: add ckpt=PATH/quantized.safetensors.")
    from tfmq_exp.diffusion.sampling import unet_fn
    from tfmq_exp.export.deploy_graph import build_deploy_model, has_step_tables, step_table_groups
    from tfmq_exp.export.packing import is_packed, pack_checkpoint
    from tfmq_exp.export.size_report import bops_per_step, size_report
    from tfmq_exp.quant.steps import step_context
    from tfmq_exp.tasks.conditioning import conditioning_for
    from tfmq_exp.tasks.sample import check_schedule

    seed_everything(cfg.seed)
    e = cfg.export
    model, meta = load_for_export(cfg, cfg.ckpt)
    unet = model.unet.eval()
    sampler = build_sampler(cfg, model)
    check_schedule(meta, sampler.timesteps, unet, sampler.describe())
    shape = image_shape(model)
    b = int(e.verify_batch)
    # conditional models (class or text): the context is a model input, shaped as the sampler passes it
    cond, _ = conditioning_for(cfg, model, b, int(cfg.seed))
    ctx = None if cond is None else cond.rows(range(b))
    ctx_shape = None if ctx is None else tuple(ctx.shape[1:])
    timings: dict[str, float] = {}
    sizes = size_report(unet)
    bops = bops_per_step(unet, shape, ctx_shape)
    packed_info = None
    if not is_packed(cfg.ckpt):
        packed_info = pack_checkpoint(cfg.ckpt, out / "packed.safetensors")
    tables = has_step_tables(unet)
    mode = e.step_tables if tables else "none"
    example = ovb.example_inputs(shape, b, ctx_shape)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if mode == "per_step":  # one IR with the first group's constants; the others' ranges beside it
        groups = step_table_groups(unet)
        deploy = build_deploy_model(unet, "per_step", step=groups[0][0])
        ov_model = ovb.convert(deploy, example)
        extra = {"step_ranges": "step_ranges.npz"}
        write_step_ranges(out / "step_ranges.npz", ov_model, deploy, groups)
        models = [{"xml": "model.xml", "steps": g, "ranges": k} for k, g in enumerate(groups)]
    else:
        ov_model = ovb.convert(build_deploy_model(unet, e.step_tables), example)
        models = [{"xml": "model.xml", "steps": None}]
    ovb.save(ov_model, out / "model.xml")
    del ov_model
    timings["convert_s"] = round(time.perf_counter() - t0, 3)
    ir_bytes = (out / "model.bin").stat().st_size + sum(p.stat().st_size for p in out.glob("step_ranges.npz"))

    # agreement with the fake-quant model on a few steps, and the executed precisions
    from tfmq_exp.export.openvino_backend import OpenVINOUNet

    manifest = {
        "format": e.format, "step_tables": mode, "models": models, "image_shape": list(shape),
        "conditional": ctx is not None, "timesteps": sampler.timesteps, "sampler": sampler.describe(),
        "model": cfg.model.name, "ckpt": str(cfg.ckpt), "quantizer": meta.get("quantizer"), "bits": meta.get("bits"),
        **extra,
    }
    write_json(out / "export.json", manifest)
    runner = OpenVINOUNet(out, e.precision, int(e.threads))
    t0 = time.perf_counter()
    runner.compiled(0, b)
    timings["compile_s"] = round(time.perf_counter() - t0, 3)
    precisions = ovb.precision_report(runner.compiled(0, b))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    x = torch.randn(b, *shape, generator=gen)
    check_steps = sorted({0, len(sampler.timesteps) // 2, len(sampler.timesteps) - 1})
    diffs = {}
    for i in check_steps:
        t = torch.full((b,), sampler.timesteps[i], dtype=torch.long)
        with torch.no_grad(), step_context(i):
            ref = unet_fn(unet)(x, t, ctx)
            got = runner(x, t, ctx)
        diffs[str(i)] = {"max_abs": float((got - ref).abs().max()), "ref_abs_max": float(ref.abs().max()),
                         "rel_l2": float((got - ref).norm() / ref.norm())}
    quantized = sorted(n for n, m in unet.named_modules() if _both_quantized(m))
    results = {
        "task": "export",
        "model": cfg.model.name,
        "ckpt": str(cfg.ckpt),
        "quantizer": meta.get("quantizer"),
        "bits": meta.get("bits"),
        "step_tables": mode,
        "n_models": len(models),
        "size": sizes,
        "bops_per_step": bops,
        "packed_checkpoint": packed_info,
        "ir_mb": round(ir_bytes / 1e6, 4),
        "quantized_layers": len(quantized),
        "quantized_layers_int8": len(set(quantized) & set(precisions["int8_modules"])),
        "quantized_layers_not_int8": sorted(set(quantized) - set(precisions["int8_modules"])),
        "executed": {k: v for k, v in precisions.items() if k not in ("float_layer_names", "int8_modules")},
        "unet_vs_fake_quant": diffs,
        "timings": timings,
    }
    write_json(out / "results.json", results)
    log.info(
        "exported %s (%s, %s): %d of %d quantized layers run in int8; packed %.3f MB vs FP32 %.3f MB; wrote %s",
        cfg.ckpt, meta.get("bits"), mode, results["quantized_layers_int8"], len(quantized),
        sizes["packed_mb"], sizes["fp32_mb"], out,
    )
    return results


def write_step_ranges(path: Path, ov_model: Any, deploy: Any, groups: list[list[int]]) -> None:
    """Every table group's quantize ranges (``baked_step_ranges``), after checking that the first group's
    equal the constants the converter wrote, bit for bit (so a patched model is that step's model)."""
    import numpy as np

    from tfmq_exp.export import openvino_backend as ovb
    from tfmq_exp.export.deploy_graph import baked_step_ranges

    ranges = baked_step_ranges(deploy, [g[0] for g in groups])
    owner = {n: n for n in ranges}
    for name, into in ovb.merged_fake_quantize(ov_model, sorted(ranges)).items():
        # the converter moved the node (across a transpose: the table follows it) or merged equal nodes on one
        # input (to_q, to_k, to_v: one node, one table, right only if their tables are equal at every step)
        mine = ranges.pop(name)
        if into and into not in ranges:
            ranges[into], owner[into] = mine, name
        elif not into:
            layer = name.split(".act/")[0].removeprefix("__module.unet.")
            raise UserError(f"per-step export: the quantizer of {layer} has no quantize node in the converted model. "
                            "Fix: export with export.step_tables=runtime.")
        elif not all(torch.equal(a, b) for a, b in zip(mine, ranges[into])):
            other = owner.get(into, "").split(".act/")[0].removeprefix("__module.unet.")
            raise UserError(
                f"per-step export: the converter merged the input quantizers of "
                f"{name.split('.act/')[0].removeprefix('__module.unet.')} and {other} (one input, equal ranges at "
                "step 0), but their tables differ at a later step. Fix: export with export.step_tables=runtime."
            )
    names = sorted(ranges)
    lo = torch.stack([ranges[n][0] for n in names], 1).numpy()  # (groups, quantizers)
    hi = torch.stack([ranges[n][1] for n in names], 1).numpy()
    got_lo, got_hi = ovb.fake_quantize_ranges(ov_model, names)
    if not (np.array_equal(got_lo, lo[0]) and np.array_equal(got_hi, hi[0])):
        raise RuntimeError("per-step export: the converted quantize ranges differ from the tables; "
                           "use export.step_tables=runtime")
    np.savez(path, names=np.asarray(names), lo=lo, hi=hi)


def _both_quantized(m: torch.nn.Module) -> bool:
    from tfmq_exp.quant.modules import QuantMixin

    return isinstance(m, QuantMixin) and any(q.enabled for q in m.weight_quantizers()) and any(
        q.enabled for q in m.input_quantizers()
    )

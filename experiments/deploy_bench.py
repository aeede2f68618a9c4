"""Deployment benchmark: per-step UNet latency and peak memory, PyTorch FP32 eager against OpenVINO
FP32, W8A8 with one range per quantizer, W8A8 with per-step tables (TFMQ-DM) and W4A8 (run on the
int8 kernels), on the embedded MNIST UNet and on full-size random-weight LDM-4 Bedrooms and SD v1.4
UNets. Writes experiments/results/deploy_bench.json.

    OMP_NUM_THREADS=1 python experiments/deploy_bench.py --models embedded ldm4 sd --threads 1

Every variant of a model quantizes the same layers (every Conv2d/Linear, min-max ranges from one
calibration batch: the latency does not depend on the rounding); the per-step variant adds 50-step
tables whose scales and zero points differ per step (synthesized from the one range: their values do
not change the cost). Each measurement runs in its own process (peak RSS of that process alone).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_STEPS = 50


def build_unet(name: str):
    """(unet, sample shape, conditioning shape or None) with random weights (seed 0) for the full-size models."""
    import torch

    torch.manual_seed(0)
    if name == "embedded":
        from omegaconf import OmegaConf

        from tfmq_exp.models.loader import load_model

        m = load_model(OmegaConf.load(ROOT / "conf/model/mnist.yaml"))
        return m.unet, (1, 28, 28), None
    if name == "ldm4":
        from diffusers import UNet2DModel

        unet = UNet2DModel(
            sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
            block_out_channels=(224, 448, 672, 896),
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            attention_head_dim=32,
        )
        return unet.eval().requires_grad_(False), (3, 64, 64), None
    if name == "sd":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD v1.x layout otherwise default
        return unet.eval().requires_grad_(False), (4, 64, 64), (77, 768)
    raise ValueError(name)


def quantize_for_bench(unet, shape, cond, w_bits: int, tables: bool):
    """RTN W{w_bits}A8 with min-max ranges from one batch; optional synthesized 50-step tables."""
    import torch

    from tfmq_exp.quant import QuantizerSpec, QuantRecipe, quantize
    from tfmq_exp.quant.quantizer import UniformQuantizer

    recipe = QuantRecipe(weight=QuantizerSpec(n_bits=w_bits, per_channel=True, init="minmax"),
                         act=QuantizerSpec(n_bits=8, init="minmax"))
    gen = torch.Generator().manual_seed(1)

    def loop(m):
        x = torch.randn(1, *shape, generator=gen)
        args = (x, torch.tensor([500])) + (() if cond is None else (torch.randn(1, *cond, generator=gen),))
        m(*args)

    with torch.no_grad():
        quantize(unet, recipe, loop)
    if tables:
        for q in unet.modules():
            if isinstance(q, UniformQuantizer) and q.enabled and not q.per_channel:
                i = torch.arange(N_STEPS, dtype=torch.float32)
                scale = q.scale.reshape(()) * (0.7 + 0.6 * i / N_STEPS)
                lo = -q.scale.reshape(()) * q.zero_point.reshape(())
                q.set_step_tables(scale, torch.clamp(torch.round(-lo / scale), 0, 255))
    return unet


def export_variant(model_name: str, variant: str, folder: Path, batch: int) -> dict:
    """Build, quantize and convert one variant into ``folder``; returns what the export measured."""
    import torch

    from tfmq_exp.export import openvino_backend as ovb
    from tfmq_exp.export.deploy_graph import build_deploy_model, step_table_groups
    from tfmq_exp.export.size_report import bops_per_step, size_report

    unet, shape, cond = build_unet(model_name)
    info: dict = {}
    if variant == "ov_fp32":
        from tfmq_exp.export.deploy_graph import DeployUNet

        deploy = DeployUNet(unet, cond is not None)
        info["size"] = size_report(unet)
    else:
        w_bits = 4 if variant == "ov_w4a8" else 8
        tables = variant.startswith("ov_w8a8_tables")
        t0 = time.perf_counter()
        quantize_for_bench(unet, shape, cond, w_bits, tables)
        info["quantize_s"] = round(time.perf_counter() - t0, 2)
        info["size"] = size_report(unet)
        info["bops_per_step"] = bops_per_step(unet, shape, cond)
        if variant == "ov_w8a8_tables_per_step":  # as task=export writes it: one IR plus every step's ranges
            groups = step_table_groups(unet)
            info["distinct_tables"] = len(groups)
            deploy = build_deploy_model(unet, "per_step", step=0)
        else:
            deploy = build_deploy_model(unet, "runtime")
    del unet
    gc.collect()
    ex = ovb.example_inputs(shape, batch, cond)
    t0 = time.perf_counter()
    model = ovb.convert(deploy, ex, dynamic_batch=True)
    info["convert_s"] = round(time.perf_counter() - t0, 2)
    if variant == "ov_w8a8_tables_per_step":
        from tfmq_exp.tasks.export import write_step_ranges

        write_step_ranges(folder / "step_ranges.npz", model, deploy, groups)
        info["ranges_kb"] = round((folder / "step_ranges.npz").stat().st_size / 1e3, 1)
    del deploy
    gc.collect()
    ovb.save(model, folder / "model.xml")
    info["ir_mb"] = round((folder / "model.bin").stat().st_size / 1e6, 3)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return info


def worker(args: argparse.Namespace) -> None:
    """One measurement in a fresh process: compile (maybe several copies) and time one UNet call."""
    import numpy as np

    spec = json.loads(args.worker)
    batch, reps, threads = spec["batch"], spec["reps"], spec["threads"]
    shape, cond = spec["shape"], spec["cond"]
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((batch, *shape)).astype(np.float32),
             "timestep": np.full((batch,), 500, dtype=np.int64), "step": np.array(3, dtype=np.int64)}
    if cond:
        feeds["encoder_hidden_states"] = rng.standard_normal((batch, *cond)).astype(np.float32)
    out: dict = {}
    if spec["kind"] == "paired":
        return paired_worker(spec, feeds)
    if spec["kind"] == "torch":
        import torch

        torch.set_num_threads(threads)
        sys.path.insert(0, str(ROOT))
        unet, _, _ = build_unet(spec["model"])
        args_t = [torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"])]
        if cond:
            args_t.append(torch.from_numpy(feeds["encoder_hidden_states"]))

        def call():
            with torch.no_grad():
                unet(*args_t)
    else:
        sys.path.insert(0, str(ROOT))
        from tfmq_exp.export import openvino_backend as ovb  # no torch in this process

        t0 = time.perf_counter()
        compiled = [ovb.compile_model(load_ir(spec["xml"]), spec["precision"], threads, batch)
                    for _ in range(spec["copies"])]
        out["compile_s"] = round((time.perf_counter() - t0) / spec["copies"], 3)
        cm = compiled[0]
        rep = ovb.precision_report(cm)
        out["int8_layers"], out["float_compute_layers"] = rep["int8_layers"], rep["float_layers"]
        names = {n for i in cm.inputs for n in i.get_names()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        req = cm.create_infer_request()

        def call():
            req.infer(feeds)
    call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    out["latency_ms"] = round(1000 * statistics.median(times), 2)
    out["latency_min_ms"] = round(1000 * min(times), 2)
    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out))


PAIRED = ("ov_w8a8", "ov_w8a8_tables", "ov_w8a8_tables_per_step")


def load_ir(xml: str):  # noqa: ANN201
    """An exported IR; a per-step export's with step 1's ranges set, as the sampler loads a step's model."""
    from tfmq_exp.export import openvino_backend as ovb

    ranges = Path(xml).with_name("step_ranges.npz")
    return ovb.read_step_model(xml, ovb.load_step_ranges(ranges), 1) if ranges.is_file() else xml


def paired_worker(spec: dict, feeds: dict) -> None:
    """The single-range model and both per-step forms compiled side by side in one process and called in
    turn, round after round: load changes hit all three alike, so their ratios are the cleanest figure."""
    sys.path.insert(0, str(ROOT))
    from tfmq_exp.export import openvino_backend as ovb

    models = {}
    for variant, xml in spec["xmls"].items():
        cm = ovb.compile_model(load_ir(xml), "f32", spec["threads"], spec["batch"])
        names = {n for i in cm.inputs for n in i.get_names()}
        req = cm.create_infer_request()
        f = {k: v for k, v in feeds.items() if k in names}
        req.infer(f)
        models[variant] = (req, f)
    times: dict[str, list[float]] = {v: [] for v in models}
    for _ in range(spec["reps"]):
        for variant, (req, f) in models.items():
            t0 = time.perf_counter()
            req.infer(f)
            times[variant].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    base = med["ov_w8a8"]
    out = {"latency_ms": {v: round(1000 * m, 2) for v, m in med.items()},
           "vs_one_range": {v: round(m / base, 4) for v, m in med.items()},
           "min_ms": {v: round(1000 * min(t), 2) for v, t in times.items()}, "rounds": spec["reps"]}
    print("RESULT " + json.dumps(out))


def run_paired(args: argparse.Namespace, results: dict, out_path: Path) -> None:
    """Per model and batch: one range, per-step tables as one model (runtime) and per step (one step's model),
    timed in one process, interleaved."""
    rows = [r for r in results.get("paired", []) if r["model"] not in args.models]
    for model_name in args.models:
        _, shape, cond = build_unet(model_name)
        with tempfile.TemporaryDirectory() as tmp:
            xmls, sizes = {}, {}
            for variant in PAIRED:
                folder = Path(tmp) / variant
                folder.mkdir()
                info = export_variant(model_name, variant, folder, BATCHES[model_name][0])
                xmls[variant] = str(folder / "model.xml")
                size = info["size"]
                sizes[variant] = {"ir_mb": info["ir_mb"], "ranges_kb": info.get("ranges_kb", 0.0),
                                  "packed_mb": size["packed_mb"], "step_table_mb": size["step_table_mb"]}
            for batch in BATCHES[model_name]:
                spec = {"kind": "paired", "model": model_name, "xmls": xmls, "batch": batch, "reps": args.paired,
                        "threads": args.threads, "shape": list(shape), "cond": list(cond) if cond else None}
                row = {"model": model_name, "batch": batch, **measure(spec, args.timeout), "sizes": sizes}
                print(json.dumps(row), flush=True)
                rows.append(row)
                results["paired"] = rows
                out_path.write_text(json.dumps(results, indent=1))


def paired_table(results: dict) -> str:
    lines = ["| model | batch | one range (ms) | per-step, one model (`runtime`) (ms) | per-step, one model per step "
             "(`per_step`) (ms) | rounds |", "|---|---|---|---|---|---|"]
    for r in results.get("paired", []):
        if "latency_ms" not in r:
            lines.append(f"| {r['model']} | {r['batch']} | not measured: {r.get('error', '')[:80]} | | | |")
            continue
        lat, rel, fast = r["latency_ms"], r["vs_one_range"], r["min_ms"]
        cells = [f"{lat[v]} ({100 * (rel[v] - 1):+.1f}%; fastest call {100 * (fast[v] / fast['ov_w8a8'] - 1):+.1f}%)"
                 for v in PAIRED[1:]]
        lines.append(f"| {r['model']} | {r['batch']} | {lat['ov_w8a8']} | {cells[0]} | {cells[1]} | {r['rounds']} |")
    return "\n".join(lines)


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(spec: dict, timeout: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def fid_check(ckpt: str, n: int, threads: int, overrides: list[str]) -> dict:
    """Export ``ckpt``, sample ``n`` digits from the same noise with the fake-quant PyTorch model and
    the OpenVINO model, and score both against the 5,000 reference digits (the evaluator's FID)."""
    import tempfile

    import numpy as np
    from hydra import compose, initialize_config_dir

    from tfmq_exp.config import register_configs
    from tfmq_exp.diffusion.sampling import to_uint8, unet_fn
    from tfmq_exp.eval import evaluate
    from tfmq_exp.export.sample_backend import openvino_model_fn, sampling_batch
    from tfmq_exp.tasks.common import build_sampler, image_shape
    from tfmq_exp.tasks.export import load_for_export, run_export

    register_configs()
    tmp = Path(tempfile.mkdtemp(prefix="deploy_fid_"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "task=export", f"ckpt={ckpt}", f"paths.output_dir={tmp}", f"export.threads={threads}",
            f"evaluator.n_samples={n}", *overrides])
    exp = run_export(cfg, tmp)
    model, _ = load_for_export(cfg, ckpt)
    sampler = build_sampler(cfg, model)
    shape, bs, seed = image_shape(model), int(cfg.sampler.batch_size), int(cfg.seed)
    t0 = time.perf_counter()
    torch_img = to_uint8(sampler.sample(unet_fn(model.unet), n, shape, seed, bs, desc="fake-quant"))
    t_torch = time.perf_counter() - t0
    cfg.export.dir = str(tmp)  # as task=sample backend=openvino runs it (per-step exports: step-major)
    runner, _ = openvino_model_fn(cfg, sampler, {})
    t0 = time.perf_counter()
    ov_img = to_uint8(sampler.sample(runner, n, shape, seed, sampling_batch(cfg, runner), desc="openvino"))
    t_ov = time.perf_counter() - t0
    a, b = torch_img.double(), ov_img.double()
    mse = float(((a - b) ** 2).mean())
    cache = Path(cfg.paths.cache_dir).expanduser() / "eval"
    out = {"ckpt": ckpt, "n": n, "seed": seed, "sampler": sampler.describe(),
           "quantized_layers": exp["quantized_layers"], "quantized_layers_int8": exp["quantized_layers_int8"],
           "psnr_db": round(10 * float(np.log10(255**2 / max(mse, 1e-12))), 2),
           "max_abs_levels": int((a - b).abs().max()), "pixels_differing": round(float((a != b).double().mean()), 4),
           "sampling_s": {"torch_fake_quant": round(t_torch, 1), "openvino": round(t_ov, 1)},
           "step_tables": exp["step_tables"], "openvino_compiles": runner.stats,
           "machine": {"threads": threads, "load_avg": os.getloadavg()}}
    for name, imgs in (("torch_fake_quant", torch_img), ("openvino", ov_img)):
        m = evaluate(imgs, cfg.evaluator, reference="mnist", fp_images=None, cache_dir=cache, out_dir=tmp / name)
        out[name] = {k: m[k] for k in ("fid", "sfid", "kid") if k in m}
    return out


LABELS = {"torch_fp32": "PyTorch FP32 eager", "ov_fp32": "OpenVINO FP32", "ov_w8a8": "OpenVINO W8A8, one range",
          "ov_w8a8_tables": "OpenVINO W8A8, per-step tables (one model)",
          "ov_w8a8_tables_per_step": "OpenVINO W8A8, per-step tables (one model per step, step-major)",
          "ov_w4a8": "OpenVINO W4A8 (int8 kernels)"}


def table(results: dict) -> str:
    """The README table: latency per UNet call and speed-up over PyTorch FP32 eager, peak memory, sizes."""
    order = {m: i for i, m in enumerate(BATCHES)}
    rows = sorted(results.get("rows", []), key=lambda r: (order.get(r["model"], 9), VARIANTS.index(r["variant"])
                                                          if r["variant"] in VARIANTS else 9, r.get("batch", 0)))
    lines = ["| model | variant | batch | latency (ms) | speed-up vs PyTorch FP32 | vs OpenVINO FP32 | peak RSS (MB) "
             "| packed size (MB) | int8 layers | compile (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["batch"]): r.get("latency_ms") for r in rows if r["variant"] == "torch_fp32"}
    ovfp = {(r["model"], r["batch"]): r.get("latency_ms") for r in rows if r["variant"] == "ov_fp32"}
    for r in rows:
        if "latency_ms" not in r:
            lines.append(f"| {r['model']} | {LABELS.get(r['variant'], r['variant'])} | {r.get('batch', '-')} | "
                         f"not measured: {r.get('error', '')[:80]} | | | | | | |")
            continue
        b0, b1 = base.get((r["model"], r["batch"])), ovfp.get((r["model"], r["batch"]))
        size = r.get("size", {}).get("packed_mb" if r["variant"].startswith("ov_w") else "fp32_mb", "")
        copies = f" ({r['copies']} compiled)" if r.get("copies", 1) > 1 else ""
        vs_ov = f"{b1 / r['latency_ms']:.2f}x" if b1 else "-"
        vs_pt = f"{b0 / r['latency_ms']:.2f}x" if b0 else "-"
        lines.append(
            f"| {r['model']} | {LABELS.get(r['variant'], r['variant'])}{copies} | {r['batch']} | {r['latency_ms']} | "
            f"{vs_pt} | {vs_ov} | "
            f"{r['peak_rss_mb']} | {size} | {r.get('int8_layers', 0)} | {r.get('compile_s', '')} |"
        )
    return "\n".join(lines)


BATCHES = {"embedded": (1, 64), "ldm4": (1, 8), "sd": (1, 2)}
VARIANTS = ("torch_fp32", "ov_fp32", "ov_w8a8", "ov_w8a8_tables", "ov_w8a8_tables_per_step", "ov_w4a8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["embedded", "ldm4", "sd"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--per-step-copies", type=int, default=1,
                    help="compiled copies for the per-step variant at batch 1 (the sampler keeps one; more "
                         "measure the memory of keeping several)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    ap.add_argument("--out", default=str(ROOT / "experiments/results/deploy_bench.json"))
    ap.add_argument("--fid-ckpt", help="instead of timing: FID and agreement of this embedded checkpoint's export")
    ap.add_argument("--fid-n", type=int, default=250)
    ap.add_argument("--table", action="store_true", help="print the README table of --out and exit")
    ap.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                    help="instead of the rows: one range and the two per-step forms timed side by side in one "
                         "process, ROUNDS interleaved calls each (per model and batch)")
    ap.add_argument("overrides", nargs="*", help="config overrides for --fid-ckpt (e.g. quantizer=tfmq)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT))
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if args.table:
        print(table(results))
        if results.get("paired"):
            print()
            print(paired_table(results))
        return None
    if args.paired:
        run_paired(args, results, out_path)
        return None
    if args.fid_ckpt:
        res = fid_check(args.fid_ckpt, args.fid_n, args.threads, args.overrides)
        print(json.dumps(res, indent=1))
        results = json.loads(out_path.read_text()) if out_path.is_file() else {}  # the timing run may have written
        results.setdefault("fid", []).append(res)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
        return None
    results["machine"] = {"cpu_count": os.cpu_count(), "threads": args.threads,
                          "load_avg_at_start": os.getloadavg(), "reps": args.reps}
    rows = [r for r in results.get("rows", []) if r["model"] not in args.models or r["variant"] not in args.variants]
    for model_name in args.models:
        _, shape, cond = build_unet(model_name)
        gc.collect()
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as tmp:
                info: dict = {}
                xml = None
                if variant != "torch_fp32":
                    t0 = time.perf_counter()
                    try:
                        info = export_variant(model_name, variant, Path(tmp), BATCHES[model_name][0])
                    except Exception as err:  # noqa: BLE001 (record and go on: e.g. out of memory)
                        rows.append({"model": model_name, "variant": variant, "error": f"export: {err}"[:300]})
                        continue
                    info["export_wall_s"] = round(time.perf_counter() - t0, 1)
                    xml = str(Path(tmp) / "model.xml")
                for batch in BATCHES[model_name]:
                    copies = 1
                    if variant == "ov_w8a8_tables_per_step" and batch == BATCHES[model_name][0]:
                        copies = args.per_step_copies
                    spec = {"kind": "torch" if xml is None else "ov", "model": model_name, "xml": xml,
                            "batch": batch, "reps": args.reps, "threads": args.threads, "shape": list(shape),
                            "cond": list(cond) if cond else None, "precision": "f32", "copies": copies}
                    res = measure(spec, args.timeout)
                    row = {"model": model_name, "variant": variant, "batch": batch, "copies": copies, **res, **info}
                    print(json.dumps({k: v for k, v in row.items() if k not in ("size", "bops_per_step")}),
                          flush=True)
                    rows.append(row)
                    results["rows"] = rows
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    out_path.write_text(json.dumps(results, indent=1))
    results["load_avg_at_end"] = os.getloadavg()
    out_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

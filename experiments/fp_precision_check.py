"""How far reduced-precision FP targets (``recon.fp_precision``) move the quantized model, on the embedded model.

    OMP_NUM_THREADS=1 python experiments/fp_precision_check.py                      # tfmq and qdiff, w4a8, bf16
    OMP_NUM_THREADS=1 python experiments/fp_precision_check.py --methods tfmq --precision f16

For each method: one quantize run with FP targets in f32 (the default) and one with the FP passes under
autocast, on the same calibration record and seed. Compared: the hard AdaRound roundings (share of weights
with the same integer code), the activation tables (relative difference of the steps), the samples (PSNR of one
run's samples to the other's, and each run's PSNR to the FP samples) and the stage times. Writes
experiments/results/fp_precision_check.json. On a CPU the time is not the point (autocast there may be
slower); the quality figures are what a GPU run would also see, up to its own rounding of bf16 matmuls.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def quantize(method: str, bits: str, precision: str, out: Path, reuse: bool) -> Path:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tfmq_exp.app import run
    from tfmq_exp.config import register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    run_dir = out / f"{method}_{bits}_{precision}"
    done = run_dir / "results.json"
    if reuse and done.is_file() and json.loads(done.read_text()).get("complete"):
        return run_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"quantizer={method}", f"bits={bits}", "evaluator=none", f"recon.fp_precision={precision}",
            f"paths.output_dir={run_dir}"])
    run(cfg)
    return run_dir


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def compare(ref: Path, other: Path) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "quantized.safetensors")), load_file(str(other / "quantized.safetensors"))
    codes = [k for k in a if k.endswith("weight_int")]  # the integer weights the checkpoint stores
    same = sum(int((a[k] == b[k]).sum()) for k in codes)
    total = sum(a[k].numel() for k in codes)
    steps = [k for k in a if k.endswith("step_scale") or (k.endswith(".scale") and "input_quantizer" in k)]
    rel = torch.cat([((b[k] - a[k]).abs() / a[k].abs().clamp_min(1e-12)).flatten() for k in steps]) if steps else None
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (ref, other))
    sa, sb = (np.load(d / "samples.npz")["arr_0"] for d in (ref, other))
    return {
        "rounding_weights": total, "rounding_same_share": same / total if total else None,
        "act_step_tensors": len(steps),
        "act_step_rel_diff_median": None if rel is None else float(rel.median()),
        "act_step_rel_diff_max": None if rel is None else float(rel.max()),
        "samples_psnr_between_db": psnr(sa, sb), "samples": int(sa.shape[0]),
        "fp_psnr_db": {"f32": ra["metrics"]["fp_psnr"], "reduced": rb["metrics"]["fp_psnr"]},
        "timings": {"f32": ra["timings"], "reduced": rb["timings"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["tfmq", "qdiff"])
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "fp_precision_check")
    ap.add_argument("--reuse", action="store_true", help="keep runs of an earlier call that completed")
    args = ap.parse_args()
    rows = []
    for m in args.methods:
        ref = quantize(m, args.bits, "f32", args.out, args.reuse)
        other = quantize(m, args.bits, args.precision, args.out, args.reuse)
        row = {"method": m, "bits": args.bits, "precision": args.precision, **compare(ref, other)}
        rows.append(row)
        print(f"{m} {args.bits} {args.precision}: {100 * row['rounding_same_share']:.2f} % of roundings the same, "
              f"samples {row['samples_psnr_between_db']:.1f} dB apart, PSNR to FP "
              f"{row['fp_psnr_db']['f32']:.2f} (f32) / {row['fp_psnr_db']['reduced']:.2f} dB")
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Run fp, rtn, brecq, qdiff and tfmq at several bit settings on the same budget; write a Markdown table.

Every method gets the same calibration record (cached after the first run), the same
reconstruction budget (``recon=``), the same pool size and the same evaluation seed.

    python experiments/compare_methods.py                      # the README table
    python experiments/compare_methods.py --bits w8a8 w4a8 --out experiments/results/compare_mnist_ldm \
        --extra model=mnist_ldm                                # the conditional latent model's table
    python experiments/compare_methods.py --bits w4a8 --methods rtn tfmq --extra recon=smoke evaluator=none
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = [
    ("fid", "FID"), ("sfid", "sFID"), ("kid_mean", "KID"), ("class_accuracy", "class acc"),
    ("fp_psnr", "PSNR vs FP (dB)"), ("fp_mse", "MSE vs FP"),
]
TIMES = [("calib_data_s", "calib data (s)"), ("weight_stage_s", "weight stage (s)"), ("act_stage_s", "act stage (s)"),
         ("quantization_s", "quantization (s)")]


def run_one(method: str, bits: str, out: Path, extra: list[str]) -> dict:
    res_file = out / "results.json"
    if res_file.is_file():
        return json.loads(res_file.read_text())
    cmd = [sys.executable, "-m", "tfmq_exp", f"quantizer={method}", f"bits={bits}", f"hydra.run.dir={out}", *extra]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(res_file.read_text())


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def table(rows: list[dict]) -> str:
    """One row per run; a metric column only where some run reports it (class acc: conditional models)."""
    metrics = [(k, h) for k, h in METRICS if any(r["metrics"].get(k) is not None for r in rows)]
    head = ["method", "bits", *[m[1] for m in metrics], *[t[1] for t in TIMES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["quantizer"], r["bits"], *[fmt(r["metrics"].get(k)) for k, _ in metrics],
                 *[fmt(r["timings"].get(k)) for k, _ in TIMES]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """TFMQ-DM's quantization time over Q-Diffusion's, per bit setting (the paper's speed claim)."""
    t = {(r["quantizer"], r["bits"]): r["timings"].get("quantization_s") for r in rows}
    lines = [f"- {b}: TFMQ-DM / Q-Diffusion quantization time = {t[('tfmq', b)] / t[('qdiff', b)]:.2f}"
             for b in sorted({r["bits"] for r in rows})
             if t.get(("tfmq", b)) and t.get(("qdiff", b))]
    return ("\n\n" + "\n".join(lines)) if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["rtn", "brecq", "qdiff", "tfmq"])
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w4a8", "w4a32"])
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "compare_methods")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides passed to every run, e.g. recon=smoke")
    ap.add_argument("--skip-fp", action="store_true", help="no full-precision reference row")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [] if args.skip_fp else [run_one("fp", "fp", args.out / "fp", args.extra)]
    for bits in args.bits:
        for method in args.methods:
            rows.append(run_one(method, bits, args.out / f"{method}_{bits}", args.extra))
    md = table(rows) + ratios(rows)
    extra = " ".join(args.extra) or "(defaults)"
    text = f"Overrides: {extra}\n\n{md}\n"
    (args.out / "table.md").write_text(text)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()

"""Q-Diffusion's LSQ stage with and without the weight stage's kept FP captures (``recon.keep_fp_gb``), on the
embedded model: quantization time and its parts for each, and whether the two quantized models are identical.

    OMP_NUM_THREADS=1 python experiments/keep_fp_check.py            # qdiff w4a8, the default budget
    OMP_NUM_THREADS=1 python experiments/keep_fp_check.py --extra recon=smoke   # seconds

Writes experiments/results/keep_fp_check.json. Run it alone: the two runs are compared with each other.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def _profiler():  # noqa: ANN202
    path = ROOT / "experiments" / "profile_quantization.py"
    spec = importlib.util.spec_from_file_location("profile_quantization", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="qdiff")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for both runs, e.g. recon=smoke")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "keep_fp_check")
    args = ap.parse_args(argv)
    prof = _profiler()
    rows, tensors = {}, {}
    for name, keep in (("recapture", "0"), ("kept", "4.0")):
        out_dir = args.out / name
        rows[name] = prof.profile(args.method, args.bits, [*args.extra, f"recon.keep_fp_gb={keep}"], out_dir)
        tensors[name] = load_file(str(out_dir / f"{args.method}_{args.bits}" / "quantized.safetensors"))
    a, b = tensors["recapture"], tensors["kept"]
    differing = sorted(k for k in a if k not in b or not torch.equal(a[k], b[k]))
    q = {k: r["timings"]["quantization_s"] for k, r in rows.items()}
    act = {k: r["timings"]["act_stage_s"] for k, r in rows.items()}
    result = {
        "method": args.method, "bits": args.bits, "overrides": args.extra, "threads": torch.get_num_threads(),
        "identical_checkpoints": not differing and a.keys() == b.keys(), "differing_tensors": differing[:20],
        "tensors": len(a), "quantization_s": q, "act_stage_s": act,
        "speedup_quantization": round(q["recapture"] / q["kept"], 3),
        "speedup_act_stage": round(act["recapture"] / act["kept"], 3),
        "rows": rows,
    }
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps(result, indent=1))
    print(f"quantization {q['recapture']:.1f} s -> {q['kept']:.1f} s, activation stage {act['recapture']:.1f} s -> "
          f"{act['kept']:.1f} s; checkpoints identical: {result['identical_checkpoints']} ({len(a)} tensors)")
    print(f"wrote {path}")
    return 0 if result["identical_checkpoints"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where each method's quantization time goes, on the embedded model: one in-process run per method with
timers around the parts (capture of unit inputs and FP targets, AdaRound loops, TIAR, the Lp range searches,
activation init/running statistics, LSQ, FSC), plus the fake-quant overhead of one UNet forward.

    OMP_NUM_THREADS=1 python experiments/profile_quantization.py                 # rtn brecq qdiff tfmq, w4a8
    OMP_NUM_THREADS=1 python experiments/profile_quantization.py --methods tfmq --extra recon=smoke

Times are inclusive (a capture inside the weight stage counts in both); "calls" says how often each ran.
Writes experiments/results/profile_quantization.json. Run it alone on the machine: the parts are compared
with each other, so a second job on the same cores skews the split.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# (module, attribute, label): each wrapped where the caller looks it up
PARTS = [
    ("tfmq_exp.methods.pipeline", "capture_inputs", "capture unit inputs"),
    ("tfmq_exp.methods.pipeline", "capture_outputs", "capture FP targets"),
    ("tfmq_exp.methods.pipeline", "capture_io", "capture FP inputs and targets (one pass)"),
    ("tfmq_exp.methods.reconstruction", "weight_stage", "weight stage (units)"),
    ("tfmq_exp.methods.reconstruction", "tiar_stage", "TIAR (temporal block AdaRound)"),
    ("tfmq_exp.methods.pipeline", "optimize_rounding", "AdaRound loops (incl. TIAR's)"),
    ("tfmq_exp.methods.reconstruction", "lsq_stage", "LSQ stage (units)"),
    ("tfmq_exp.methods.pipeline", "optimize_steps", "LSQ loops"),
    ("tfmq_exp.methods.reconstruction", "init_activations", "activation init + running statistics"),
    ("tfmq_exp.methods.reconstruction", "fsc_stage", "FSC per-step tables"),
    ("tfmq_exp.quant.functional", "lp_search_params", "Lp range searches (weights and activations)"),
]


def _timed(fn, label: str, acc: dict):  # noqa: ANN001, ANN202
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label]["s"] += time.perf_counter() - t0
            acc[label]["calls"] += 1

    return wrapper


@contextlib.contextmanager
def instrumented(acc: dict):
    import importlib

    saved = []
    for mod_name, attr, label in PARTS:
        mod = importlib.import_module(mod_name)
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, _timed(getattr(mod, attr), label, acc))
    try:
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


@torch.no_grad()
def forward_overhead(model: torch.nn.Module, shape: tuple[int, ...], reps: int = 5) -> dict[str, float]:
    """Seconds per UNet forward of a batch of 32 with the quantizers on and off (FSC tables at step 0)."""
    from tfmq_exp.quant.steps import step_context
    from tfmq_exp.quant.swap import set_quant_state

    x, t = torch.randn(32, *shape), torch.full((32,), 500)
    out = {}
    for name, on in (("fp_forward_s", False), ("fake_quant_forward_s", True)):
        set_quant_state(model, weight=on, act=on)
        with step_context(0):
            model(x, t)
            t0 = time.perf_counter()
            for _ in range(reps):
                model(x, t)
        out[name] = (time.perf_counter() - t0) / reps
    set_quant_state(model, weight=True, act=True)
    return out


def profile(method: str, bits: str, extra: list[str], out_dir: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from tfmq_exp.app import run
    from tfmq_exp.config import register_configs
    from tfmq_exp.tasks.sample import load_checkpoint_model

    register_configs()
    run_dir = out_dir / f"{method}_{bits}"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"quantizer={method}", f"bits={bits}", "evaluator=none", f"paths.output_dir={run_dir}",
            *extra])
    acc: dict = defaultdict(lambda: {"s": 0.0, "calls": 0})
    with instrumented(acc):
        res = run(cfg)
    saved = json.loads((run_dir / "results.json").read_text())
    row = {"method": method, "bits": bits, "timings": saved["timings"],
           "parts": {k: {"s": round(v["s"], 2), "calls": v["calls"]} for k, v in acc.items()}}
    ckpt = run_dir / "quantized.safetensors"
    if ckpt.is_file():
        model, _ = load_checkpoint_model(cfg, str(ckpt))
        row["forward"] = forward_overhead(model.unet, (model.channels, model.image_size, model.image_size))
    row["objective"] = res.get("objective")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["rtn", "brecq", "qdiff", "tfmq"])
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. recon=smoke")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "profile_quantization")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = [profile(m, args.bits, args.extra, args.out) for m in args.methods]
    result = {"threads": torch.get_num_threads(), "overrides": args.extra, "rows": rows}
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"\n{r['method']} {r['bits']}: quantization {r['timings'].get('quantization_s', 0):.1f} s")
        for k, v in sorted(r["parts"].items(), key=lambda kv: -kv[1]["s"]):
            print(f"  {k:45s} {v['s']:8.1f} s  ({v['calls']} calls)")
        if "forward" in r:
            f = r["forward"]
            print(f"  UNet forward, batch 32: FP {f['fp_forward_s'] * 1e3:.0f} ms, "
                  f"fake-quant {f['fake_quant_forward_s'] * 1e3:.0f} ms")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

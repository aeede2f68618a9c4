"""Does torch.compile pay in the AdaRound loop? One unit of the embedded UNet, W4 weights, the engine's own
loop (``optimize_rounding``) with the unit called eagerly and through ``torch.compile``: seconds per 100
iterations after warm-up, the compile time, and how many rounding decisions the two runs share.

    OMP_NUM_THREADS=1 python experiments/compile_probe.py                  # 3 units, 200 iterations each
    OMP_NUM_THREADS=1 python experiments/compile_probe.py --iters 20 --units down_blocks.0.resnets.0   # smoke

Writes experiments/results/compile_probe.json. Run it alone on the machine (the two modes are compared).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["down_blocks.0.resnets.0", "mid_block.resnets.0", "up_blocks.2.resnets.0"]


def prepare(pool: int, seed: int):  # noqa: ANN201
    """The embedded UNet with its weights, a W4A8 copy (round-to-nearest ranges), and unit inputs from the FP
    model on noisy digits-sized inputs at random steps (the loop's cost does not depend on what they are)."""
    from omegaconf import OmegaConf

    from tfmq_exp.models.loader import load_model
    from tfmq_exp.quant import QuantizerSpec, QuantRecipe
    from tfmq_exp.quant.swap import init_weight_ranges, swap_modules

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "mnist.yaml")
    fp = load_model(cfg).unet
    q = copy.deepcopy(fp)
    swap_modules(q, QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=True), act=QuantizerSpec(n_bits=8)))
    init_weight_ranges(q)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(pool, 1, 28, 28, generator=gen)
    t = torch.randint(0, 1000, (pool,), generator=gen)
    return fp, q, x, t


def capture(fp: torch.nn.Module, name: str, x: torch.Tensor, t: torch.Tensor):  # noqa: ANN201
    from tfmq_exp.recon.capture import capture_io

    batches = [(x[i:i + 64], t[i:i + 64]) for i in range(0, len(x), 64)]
    return capture_io(fp, fp.get_submodule(name), batches, lambda m, b: m(b[0], b[1]))


def run_unit(q: torch.nn.Module, name: str, inputs, targets, iters: int, compiled: bool, seed: int) -> dict:
    from tfmq_exp.methods.pipeline import weight_quantizers_of
    from tfmq_exp.quant.modules import QuantMixin
    from tfmq_exp.quant.swap import set_quant_state
    from tfmq_exp.recon.engine import FabricRunner, ReconSettings, lp_loss, optimize_rounding

    q = copy.deepcopy(q)
    set_quant_state(q, weight=True, act=False)
    unit = q.get_submodule(name)
    layers = [m for m in unit.modules() if isinstance(m, QuantMixin) and m.allow_weight_quant]
    qs = weight_quantizers_of(layers)
    call = torch.compile(unit) if compiled else unit
    first: list[float] = []

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        args, kwargs = inputs.select(idx)
        out = call(*args, **kwargs)
        loss = lp_loss(out, targets[idx])
        if len(first) < 2:
            first.append(time.perf_counter() - t0)  # the eval pass, then the first training call: compiles
        return loss

    s = ReconSettings(iters=iters, batch_size=32, eval_samples=64)
    t0 = time.perf_counter()
    rep = optimize_rounding(qs, loss_fn, inputs.n, s, FabricRunner(), seed, desc=name)
    wall = time.perf_counter() - t0
    alphas = torch.cat([(q_.alpha.detach() >= 0).flatten() for q_ in qs])
    return {"wall_s": wall, "loop_s": rep["wall_s"], "first_calls_s": first, "loss_before": rep["loss_before"],
            "loss_after": rep["loss_after"], "up": alphas}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", nargs="+", default=UNITS)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--pool", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "compile_probe.json")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    fp, q, x, t = prepare(args.pool, args.seed)
    rows = []
    for name in args.units:
        inputs, targets = capture(fp, name, x, t)
        eager = run_unit(q, name, inputs, targets, args.iters, False, args.seed)
        comp = run_unit(q, name, inputs, targets, args.iters, True, args.seed)
        same = float((eager.pop("up") == comp.pop("up")).float().mean())
        # the compiled loop's time includes its compile (first training call); per 100 iterations without it
        steady = (comp["loop_s"] - comp["first_calls_s"][1]) / max(1, args.iters - 1) * 100
        rows.append({"unit": name, "eager": eager, "compiled": comp, "rounding_agreement": same,
                     "eager_s_per_100": eager["loop_s"] / args.iters * 100, "compiled_s_per_100_steady": steady,
                     "compile_s": sum(comp["first_calls_s"]),  # the no-grad (eval) and the training graph
                     "break_even_iters": (sum(comp["first_calls_s"]) / max(1e-9, eager["loop_s"] / args.iters
                                                                         - steady / 100))
                     if eager["loop_s"] / args.iters > steady / 100 else None})
        r = rows[-1]
        print(f"{name}: eager {r['eager_s_per_100']:.2f} s/100 it, compiled {r['compiled_s_per_100_steady']:.2f} "
              f"s/100 it + {r['compile_s']:.1f} s compile; same rounding for {same:.1%} of weights", flush=True)
    res = {"what": "AdaRound loop of one embedded-UNet unit, eager vs torch.compile(unit), CPU",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "iters": args.iters, "pool": args.pool,
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the two no-gradient shortcuts save per fake-quant UNet forward, on the embedded model (W4A8).

    OMP_NUM_THREADS=1 python experiments/forward_shortcuts.py

Variants, timed interleaved (median of ``--rounds`` rounds) at FSC's batch of 16 and the sampler's 64:
FP; "plain" (the straight-through formula on every forward and every weight re-quantized per forward, the
code before the shortcuts); "fast fake-quant" (the four-pass no-gradient formula); "both" (plus
``frozen_weights``). Every variant's output is checked bit for bit against "plain". Weights are
hard-rounded (AdaRound's rounding from its initial alpha), activations calibrated per tensor on one batch.
Then TFMQ-DM's FSC (``pipeline.fsc_stage``, official sizes: Lp init on 16 samples, 256 samples per step in
mini-batches of 16) over ``--fsc-steps`` steps of random inputs, "plain" against "both", interleaved, with
the tables compared bit for bit. Writes experiments/results/forward_shortcuts.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def ste_fake_quant(x, scale, zero_point, qmin, qmax):  # noqa: ANN001, ANN201
    """The formula as written, on every call (the code before the shortcuts)."""
    from tfmq_exp.quant.functional import round_ste

    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def embedded_unet() -> torch.nn.Module:
    from hydra import compose, initialize_config_dir

    from tfmq_exp.config import register_configs
    from tfmq_exp.models.loader import load_model

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=mnist"])
    return load_model(cfg.model).unet


def bedroom_unet() -> torch.nn.Module:
    """The full-size LDM-4 Bedrooms UNet (270 M parameters), random weights, as cost_at_scale.py builds it."""
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    from cost_at_scale import build_unet, compose_presets

    return build_unet(compose_presets("bedroom")["tfmq"].model, 1.0)[0]


def quantized(unet: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """W4A8: weights hard-rounded (AdaRound's rounding from its initial alpha), activations per tensor."""
    from tfmq_exp.quant import QuantizerSpec, QuantRecipe, calibrate_activations, quant_modules
    from tfmq_exp.quant.swap import init_weight_ranges, swap_modules

    swap_modules(unet, QuantRecipe(weight=QuantizerSpec(n_bits=4, per_channel=True, init="minmax"),
                                   act=QuantizerSpec(n_bits=8, init="minmax")))
    init_weight_ranges(unet)
    for _, m in quant_modules(unet):
        m.weight_quantizer.enable_adaround(m.weight)
        m.weight_quantizer.rounding = "hard"
    gen = torch.Generator().manual_seed(0)
    calibrate_activations(unet, lambda m: m(torch.randn(2, *shape, generator=gen), torch.full((2,), 500)))
    return unet.requires_grad_(False)


def forwards(unet, variant, names, shape, batches, rounds, reps) -> list[dict]:  # noqa: ANN001
    """Median seconds per forward of each variant at each batch, interleaved; outputs against "plain"."""
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(1)
        x, t = torch.randn(batch, *shape, generator=gen), torch.full((batch,), 500)
        outs, times = {}, {n: [] for n in names}
        for n in names:
            with variant(unet, n):
                outs[n] = unet(x, t).sample  # warm-up, and the output compared below
        for _ in range(rounds):
            for n in names:
                with variant(unet, n):
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        unet(x, t)
                    times[n].append((time.perf_counter() - t0) / reps)
        med = {n: statistics.median(v) for n, v in times.items()}
        row = {"batch": batch, "ms": {n: round(v * 1e3, 2) for n, v in med.items()},
               "quant_overhead_ms": {n: round((med[n] - med["fp"]) * 1e3, 2) for n in names[1:]},
               "speedup_vs_plain": {n: round(med["plain"] / med[n], 3) for n in names[2:]},
               "bit_identical_to_plain": {n: bool(torch.equal(outs[n], outs["plain"])) for n in names[2:]}}
        rows.append(row)
        print(f"batch {batch}: " + ", ".join(f"{n} {row['ms'][n]:.1f} ms" for n in names)
              + f"; identical {row['bit_identical_to_plain']}")
    return rows


def fsc_ab(unet: torch.nn.Module, variant, steps: int, rounds: int) -> dict:  # noqa: ANN001
    """FSC of ``steps`` steps at the official sizes, "plain" and "both" alternately; median seconds."""
    from tfmq_exp.diffusion.calib_data import CalibRecord
    from tfmq_exp.methods.pipeline import all_act_quantizers, fsc_stage

    qs = all_act_quantizers(unet)
    for q in qs:  # TFMQ-DM's activation rule: Lp init (p = 2.4), then the EMA with 0 inside the range
        q.init, q.p, q.ema = "lp", 2.4, "zero_forced"
    gen = torch.Generator().manual_seed(2)
    rec = CalibRecord(xs=torch.randn(steps, 256, 1, 28, 28, generator=gen),
                      ts=torch.linspace(981, 1, steps).round().long())
    pools = {k: rec.pool(steps=[k]) for k in range(steps)}
    times: dict[str, list[float]] = {"plain": [], "both": []}
    tables = {}
    for _ in range(rounds):
        for name in times:
            with variant(unet, name):
                t0 = time.perf_counter()
                fsc_stage(unet, pools, steps, qs, init_samples=16, batch_size=16, momentum=0.95, seed=0)
                times[name].append(time.perf_counter() - t0)
            tables[name] = [t.clone() for q in qs for t in (q.step_scale, q.step_zero_point)]
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"steps": steps, "rounds": rounds, "quantizers": len(qs), "plain_s": round(med["plain"], 2),
            "both_s": round(med["both"], 2), "speedup": round(med["plain"] / med["both"], 3),
            "tables_identical": all(torch.equal(a, b) for a, b in zip(tables["plain"], tables["both"], strict=True))}


@torch.no_grad()
def main() -> None:
    from tfmq_exp.methods import pipeline
    from tfmq_exp.quant import frozen_weights, set_quant_state
    from tfmq_exp.quant import functional as F

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--fsc-steps", type=int, default=4)
    ap.add_argument("--fsc-rounds", type=int, default=3)
    ap.add_argument("--bedroom", action="store_true", help="also the full-size LDM-4 Bedrooms UNet at batch 1")
    ap.add_argument("--bedroom-rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "forward_shortcuts.json")
    args = ap.parse_args()
    unet = quantized(embedded_unet(), (1, 28, 28))
    fast = F.fake_quant

    @contextlib.contextmanager
    def variant(unet: torch.nn.Module, name: str):  # noqa: ANN202
        set_quant_state(unet, weight=name != "fp", act=name != "fp")
        F.fake_quant = ste_fake_quant if name == "plain" else fast
        pipeline.frozen_weights = frozen_weights if name == "both" else (lambda m: contextlib.nullcontext(0))
        try:
            with frozen_weights(unet) if name == "both" else contextlib.nullcontext():
                yield
        finally:
            F.fake_quant, pipeline.frozen_weights = fast, frozen_weights

    names = ["fp", "plain", "fast fake-quant", "both"]
    rows = forwards(unet, variant, names, (1, 28, 28), (16, 64), args.rounds, args.reps)
    fsc = fsc_ab(unet, variant, args.fsc_steps, args.fsc_rounds)
    print(f"FSC of {args.fsc_steps} steps: plain {fsc['plain_s']:.1f} s, both {fsc['both_s']:.1f} s "
          f"(x{fsc['speedup']:.2f}), tables identical {fsc['tables_identical']}")
    result = {"threads": torch.get_num_threads(), "rounds": args.rounds, "reps": args.reps, "rows": rows,
              "fsc": fsc}
    if args.bedroom:  # a large model at a sampling batch, where the weights are a larger share of the work
        unet = quantized(bedroom_unet(), (3, 64, 64))
        result["bedroom_rounds"] = args.bedroom_rounds
        result["bedroom"] = forwards(unet, variant, names, (3, 64, 64), (1,), args.bedroom_rounds, 1)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

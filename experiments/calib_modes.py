"""Cost of the two calibration-data modes on the embedded model: one pass (default) vs TFMQ's official
generator (fresh trajectories per step, O(T^2) model calls). Writes experiments/results/calib_modes.json.

    OMP_NUM_THREADS=1 python experiments/calib_modes.py --n 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from hydra import compose, initialize_config_dir

    from tfmq_exp.config import register_configs
    from tfmq_exp.diffusion.calib_data import collect, collect_official
    from tfmq_exp.diffusion.sampling import unet_fn
    from tfmq_exp.models.loader import load_model
    from tfmq_exp.tasks.common import build_sampler, image_shape

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="trajectories per step")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "calib_modes.json")
    args = ap.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["paths.output_dir=.", "paths.cache_dir=."])
    model = load_model(cfg.model)
    sampler = build_sampler(cfg, model)
    rows = {}
    for name, fn in (("one_pass", collect), ("official", collect_official)):
        t0 = time.perf_counter()
        rec = fn(unet_fn(model.unet), sampler, args.n, image_shape(model), int(cfg.calib.seed), args.n)
        rows[name] = {**rec.stats, "wall_s": round(time.perf_counter() - t0, 2),
                      "finite": bool(torch.isfinite(rec.xs).all())}
        print(name, rows[name], flush=True)
    result = {
        "model": cfg.model.name, "sampler": sampler.describe(), "trajectories_per_step": args.n,
        "torch_threads": torch.get_num_threads(), "modes": rows,
        "model_call_ratio": rows["official"]["model_calls"] / rows["one_pass"]["model_calls"],
        "wall_ratio": round(rows["official"]["wall_s"] / rows["one_pass"]["wall_s"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

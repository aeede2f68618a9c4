"""Quality of the FP embedded latent model (model=mnist_ldm): class accuracy and FID of guided DDIM samples.

Samples 50 digits per class with a guided DDIM loop written here (one forward of the doubled batch,
eps = eps_uc + s (eps_c - eps_uc)), decodes them with the autoencoder, and scores them with the
project's digit classifier (class accuracy) and evaluator (FID, sFID, KID against the 5,000 digits).
A small sweep over eta and the guidance scale on class accuracy alone comes first; FID is computed
for the settings in --fid-settings. Writes experiments/results/mnist_ldm_quality.json and a grid.

    OMP_NUM_THREADS=1 python experiments/mnist_ldm_quality.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from tfmq_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["model=mnist_ldm", *overrides])


@torch.no_grad()
def guided_ddim(unet, embedder, labels: torch.Tensor, abar: torch.Tensor, *, steps: int, eta: float, scale: float,
                seed: int, shape=(4, 7, 7), batch: int = 100) -> torch.Tensor:
    """Scaled latents for ``labels``; noise from one generator per batch seeded by (seed, batch index)."""
    ts = list(range(0, len(abar), len(abar) // steps))[::-1]
    out = []
    for b, start in enumerate(range(0, len(labels), batch)):
        y = labels[start : start + batch]
        n = len(y)
        gen = torch.Generator().manual_seed(seed * 100_003 + b)
        x = torch.randn((n, *shape), generator=gen)
        ctx = torch.cat([embedder(y), embedder(torch.full_like(y, embedder.null_class))])
        for i, t in enumerate(ts):
            tt = torch.full((2 * n,), t, dtype=torch.long)
            eps_c, eps_uc = unet(torch.cat([x, x]), tt, encoder_hidden_states=ctx).sample.chunk(2)
            eps = eps_uc + scale * (eps_c - eps_uc)
            a = abar[t]
            a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and i + 1 < len(ts):
                x = x + sigma * torch.randn(x.shape, generator=gen)
        out.append(x)
    return torch.cat(out)


def generate(parts, labels, args, eta: float, scale: float) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) digits of the asked classes."""
    from tfmq_exp.diffusion.sampling import to_uint8
    from tfmq_exp.models.mnist_ldm import decode

    unet, vae, emb, sf, abar = parts
    z = guided_ddim(unet, emb, labels, abar, steps=args.steps, eta=eta, scale=scale, seed=args.seed)
    return to_uint8(torch.cat([decode(vae, z[i : i + 250], sf) for i in range(0, len(z), 250)]))


def save_grid(images: torch.Tensor, path: Path, per_class: int) -> None:
    """Rows = classes 0-9, ``per_class`` columns."""
    from PIL import Image

    x = images[:, 0].numpy().reshape(10, per_class, 28, 28).transpose(0, 2, 1, 3).reshape(280, per_class * 28)
    Image.fromarray(np.ascontiguousarray(x)).resize((per_class * 56, 560), Image.NEAREST).save(path)


def main() -> None:
    from diffusers import DDPMScheduler

    from tfmq_exp.eval import evaluate
    from tfmq_exp.eval.digit_classifier import class_accuracy
    from tfmq_exp.models.mnist_ldm import load_mnist_ldm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--sweep-per-class", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--etas", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--fid-settings", nargs="+", default=["1:3", "0:3"],
                    help="eta:scale pairs scored with FID; the grid shows the first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default=None, help="model.weights (default: the committed asset)")
    ap.add_argument("--reference-n", type=int, default=None,
                    help="FID against a fixed random subset of N of the 5,000 digits (evaluator.reference_n; "
                         "default all)")
    ap.add_argument("--out", type=Path, default=RESULTS / "mnist_ldm_quality.json")
    args = ap.parse_args()

    overrides = [f"model.weights={args.weights}"] if args.weights else []
    if args.reference_n:
        overrides.append(f"evaluator.reference_n={args.reference_n}")
    cfg = compose_cfg(overrides)
    unet, vae, emb, sf, sched_cfg = load_mnist_ldm(cfg.model)
    abar = DDPMScheduler(**sched_cfg).alphas_cumprod.float()
    parts = (unet, vae, emb, sf, abar)
    from tfmq_exp.models.loader import resolve_weights_path
    from tfmq_exp.models.mnist_ldm import ASSET

    wpath = resolve_weights_path(args.weights, ASSET)
    res: dict = {"model": "mnist_ldm", "weights": args.weights or "committed asset",
                 "weights_sha256": hashlib.sha256(wpath.read_bytes()).hexdigest(), "ddim_steps": args.steps,
                 "seed": args.seed, "scaling_factor": sf, "reference_n": args.reference_n or 5000,
                 "sweep": [], "fid": []}

    labels = torch.arange(10).repeat_interleave(args.sweep_per_class)
    for eta in args.etas:
        for scale in args.scales:
            t0 = time.perf_counter()
            acc = class_accuracy(generate(parts, labels, args, eta, scale), labels)
            res["sweep"].append({"eta": eta, "scale": scale, "n": len(labels), "class_accuracy": acc,
                                 "wall_s": time.perf_counter() - t0})
            print(json.dumps(res["sweep"][-1]), flush=True)

    labels = torch.arange(10).repeat_interleave(args.per_class)
    cache = Path(cfg.paths.cache_dir).expanduser() / "eval"
    for setting in args.fid_settings:
        eta, scale = (float(v) for v in setting.split(":"))
        t0 = time.perf_counter()
        imgs = generate(parts, labels, args, eta, scale)
        row = {"eta": eta, "scale": scale, "n": len(labels), "class_accuracy": class_accuracy(imgs, labels),
               "sampling_s": time.perf_counter() - t0}
        metrics = evaluate(imgs, {**dict(cfg.evaluator), "n_samples": len(labels), "diagnostics": False},
                           reference="mnist", cache_dir=cache)
        row.update({k: metrics.get(k) for k in ("fid", "sfid", "kid_mean", "kid_std")})
        res["fid"].append(row)
        print(json.dumps(row), flush=True)
        if setting == args.fid_settings[0]:
            cols = min(10, args.per_class)  # the first samples of each class, one row per class
            grid = imgs.reshape(10, args.per_class, 1, 28, 28)[:, :cols].reshape(-1, 1, 28, 28)
            save_grid(grid, args.out.with_name("mnist_ldm_samples.png"), cols)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()

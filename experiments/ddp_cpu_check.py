"""Check that the reconstruction engine runs data-parallel: AdaRound on a toy block with Lightning
Fabric DDP over 2 CPU processes (gloo). Each rank draws its own mini-batches; gradients are
all-reduced, so the learned rounding must be identical on both ranks.

    python experiments/ddp_cpu_check.py        # writes experiments/results/ddp_cpu_check.json
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from tfmq_exp.quant import QuantRecipe
from tfmq_exp.quant.modules import quant_modules
from tfmq_exp.quant.swap import init_weight_ranges, swap_modules
from tfmq_exp.recon.engine import FabricRunner, ReconSettings, lp_loss, optimize_rounding


def main() -> None:
    torch.set_num_threads(1)
    runner = FabricRunner("cpu", 2, "ddp")  # Fabric re-launches this script as rank 1
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1))
    q = swap_modules(copy.deepcopy(fp), QuantRecipe().with_bits(4, 32))
    init_weight_ranges(q)
    x = torch.randn(256, 2, 6, 6)
    with torch.no_grad():
        target = fp(x)
    qs = []
    for _, mod in quant_modules(q):
        mod.weight_quantizer.enable_adaround(mod.weight.detach())
        qs.append(mod.weight_quantizer)
    rep = optimize_rounding(qs, lambda idx: lp_loss(q(x[idx]), target[idx]), 256, ReconSettings(iters=2000),
                            runner, seed=0)
    alphas = torch.cat([qz.alpha.detach().flatten() for qz in qs])
    gathered = runner.fabric.all_gather(alphas)
    if runner.is_main:
        same = bool(torch.equal(gathered[0], gathered[1]))
        out = {"world_size": runner.fabric.world_size, "alphas_identical_across_ranks": same, **rep}
        path = Path(__file__).resolve().parent / "results" / "ddp_cpu_check.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
        assert same, "ranks diverged: gradients were not all-reduced"


if __name__ == "__main__":
    main()

"""The optimisation loops: AdaRound over weight rounding, LSQ over activation step sizes.

Both take a ``loss_fn(idx)`` that returns the reconstruction loss of the samples ``idx``
(drawn with a fresh randperm every iteration, no epochs: docs/methods.md §1.3), so blocks,
single layers and the Temporal Information Block (TIAR) share one loop. Fabric supplies
the device and, with several processes, the gradient all-reduce (None gradients skipped,
§9 T1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tfmq_exp.checks import require_finite
from tfmq_exp.progress import progress_bar as tqdm
from tfmq_exp.quant.functional import adaround_schedule
from tfmq_exp.quant.quantizer import UniformQuantizer

LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ReconSettings:
    iters: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    act_iters: int = 5000
    act_lr: float = 4e-4
    act_p: float = 2.4
    eval_samples: int = 256
    fp_precision: str = "f32"  # the FP model's passes (targets, kept FP inputs): f32, or autocast to bf16 / f16


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean over batch and trailing dims of the sum over dim 1 of |pred - target|^p (§1.4)."""
    return (pred - target).abs().pow(p).sum(1).mean()


class FabricRunner:
    """Lightning Fabric for device placement and multi-process gradient averaging."""

    def __init__(self, accelerator: str = "cpu", devices: int | str = 1, strategy: str = "auto",
                 precision: str = "32-true", num_nodes: int = 1) -> None:
        from lightning.fabric import Fabric

        self.fabric = Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
                             num_nodes=num_nodes)
        self.fabric.launch()

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def is_main(self) -> bool:
        return self.fabric.global_rank == 0

    def backward(self, loss: torch.Tensor, params: list[torch.Tensor]) -> None:
        self.fabric.backward(loss)
        if self.fabric.world_size > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = self.fabric.all_reduce(p.grad, reduce_op="mean")


def eval_indices(n: int, k: int) -> torch.Tensor:
    """A fixed sample of ``min(n, k)`` pool indices spread evenly over the pool.

    Pools are ordered by sampling step (step-major), so even spacing takes the same share of every step:
    the reported losses describe the whole trajectory, not only its first (noisiest) step.
    """
    m = min(n, k)
    return torch.arange(m) * n // m


@torch.no_grad()
def _eval_loss(loss_fn: LossFn, n: int, k: int, what: str) -> float:
    loss = loss_fn(eval_indices(n, k))
    require_finite(loss, f"reconstruction loss of {what}",
                   "the unit's cached inputs or weights are not finite (check the FP model and the bit widths)")
    return float(loss.item())


def optimize_rounding(
    quantizers: list[UniformQuantizer], loss_fn: LossFn, n: int, s: ReconSettings, runner: FabricRunner,
    seed: int, desc: str = "adaround",
) -> dict[str, float]:
    """AdaRound: Adam on alpha only; regulariser off for the first warmup fraction, beta 20 -> 2; then hard."""
    for q in quantizers:
        q.rounding = "nearest"
    before = _eval_loss(loss_fn, n, s.eval_samples, desc)
    for q in quantizers:
        q.rounding = "soft"
    alphas = [q.alpha for q in quantizers]
    opt = torch.optim.Adam(alphas, lr=s.lr)
    gen = torch.Generator().manual_seed(seed * 1000 + runner.rank)
    t0 = time.perf_counter()
    bar = tqdm(range(1, s.iters + 1), desc=desc, leave=False, mininterval=2.0, disable=not runner.is_main)
    for k in bar:
        idx = torch.randperm(n, generator=gen)[: s.batch_size]
        rec = loss_fn(idx)
        on, beta = adaround_schedule(k, s.iters, s.warmup, s.beta_start, s.beta_end)
        loss = rec + s.reg_weight * sum(q.regularizer(beta) for q in quantizers) if on else rec
        opt.zero_grad(set_to_none=True)
        runner.backward(loss, alphas)
        opt.step()
    for q in quantizers:
        # a NaN alpha would round down silently (NaN >= 0 is false): stop where it appeared instead
        require_finite(q.alpha, f"AdaRound parameters of {desc}", "lower recon.weight_lr or check the unit's inputs")
        q.rounding = "hard"
    wall = time.perf_counter() - t0
    after = _eval_loss(loss_fn, n, s.eval_samples, desc)
    return {"loss_before": before, "loss_after": after, "wall_s": wall, "iters": s.iters}


def _as_parameter(q: UniformQuantizer) -> nn.Parameter:
    scale = q.scale.detach().clone()
    del q._buffers["scale"]
    q.scale = nn.Parameter(scale)
    return q.scale


def _as_buffer(q: UniformQuantizer) -> None:
    value = q.scale.detach().clamp_min(1e-8)
    del q._parameters["scale"]
    q.register_buffer("scale", value)


def optimize_steps(
    quantizers: list[UniformQuantizer], loss_fn: LossFn, n: int, s: ReconSettings, runner: FabricRunner,
    seed: int, desc: str = "lsq",
) -> dict[str, float]:
    """LSQ-style step learning: Adam on the scalar scales, cosine to 0 over act_iters; z fixed (§1.5)."""
    before = _eval_loss(loss_fn, n, s.eval_samples, desc)
    params = [_as_parameter(q) for q in quantizers]
    opt = torch.optim.Adam(params, lr=s.act_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s.act_iters), eta_min=0.0)
    gen = torch.Generator().manual_seed(seed * 1000 + 7 + runner.rank)
    t0 = time.perf_counter()
    try:
        for _ in tqdm(range(s.act_iters), desc=desc, leave=False, mininterval=2.0, disable=not runner.is_main):
            idx = torch.randperm(n, generator=gen)[: s.batch_size]
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            runner.backward(loss, params)
            opt.step()
            sched.step()
            with torch.no_grad():
                for p in params:
                    p.clamp_(min=1e-8)
                    require_finite(p, f"LSQ step size in {desc}", "lower recon.act_lr or check the unit's inputs")
    finally:
        for q in quantizers:
            _as_buffer(q)
    wall = time.perf_counter() - t0
    return {"loss_before": before, "loss_after": _eval_loss(loss_fn, n, s.eval_samples, desc), "wall_s": wall,
            "iters": s.act_iters}

"""Train a small denoiser (epsilon prediction) on an image tensor: the embedded model's recipe.

AdamW with linear warm-up then cosine decay to zero, EMA of the weights; the EMA weights
are what gets saved. Deterministic on CPU for a given seed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from tfmq_exp.progress import progress_bar as tqdm

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def train_denoiser(
    unet: torch.nn.Module,
    data: torch.Tensor,
    scheduler_config: dict[str, Any],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    ema_decay: float,
    seed: int,
    out_path: Path,
    log_every: int = 100,
) -> dict[str, Any]:
    """Train ``unet`` in place and write the EMA weights (fp16 safetensors) to ``out_path``."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sched = DDPMScheduler(**scheduler_config)
    abar = sched.alphas_cumprod.float()
    unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay)
    plan = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, steps))
    n = data.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", mininterval=5.0)
    for step in bar:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        x0 = data[perm[pos : pos + batch_size]]
        pos += batch_size
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        plan.step()
        ema_update(ema, unet, ema_decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            bar.set_postfix(loss=f"{recent:.4f}")
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, steps, recent, plan.get_last_lr()[0])
    wall = time.perf_counter() - start
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in ema.state_dict().items()}
    tmp = out_path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"steps": str(steps), "seed": str(seed)})
    tmp.replace(out_path)
    unet.load_state_dict(ema.state_dict())
    unet.eval().requires_grad_(False)
    tail = losses[-min(len(losses), 500) :]
    return {"steps": steps, "wall_s": wall, "final_loss": sum(tail) / max(1, len(tail)), "weights": str(out_path)}

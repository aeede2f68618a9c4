"""Sampling split across processes: rank r draws a contiguous block of sample indices with the
per-sample seeds, so N devices produce exactly the images one device would."""

from __future__ import annotations

from typing import Any

import torch

from tfmq_exp.diffusion.sampling import ModelFn, Sampler


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of rank's block: the first n % world ranks take one extra sample."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


def sample_sharded(
    sampler: Sampler, model_fn: ModelFn, n: int, image_shape: tuple[int, ...], seed: int, batch_size: int,
    fabric: Any = None, desc: str = "sample", cond: Any = None,
) -> torch.Tensor:
    """All ``n`` samples on every rank (gathered); with no ``fabric`` or one process, plain sampling."""
    world = 1 if fabric is None else fabric.world_size
    if world == 1:
        return sampler.sample(model_fn, n, image_shape, seed, batch_size, desc=desc, cond=cond)
    start, count = shard(n, fabric.global_rank, world)
    mine = sampler.sample(model_fn, count, image_shape, seed, batch_size, start=start, desc=desc, cond=cond)
    width = shard(n, 0, world)[1]
    padded = torch.zeros(width, *image_shape)
    padded[:count] = mine
    gathered = fabric.all_gather(padded.to(fabric.device)).cpu()  # (world, width, C, H, W)
    return torch.cat([gathered[r, : shard(n, r, world)[1]] for r in range(world)])

"""Per-sample random streams: an image's noise depends on (seed, sample index) only.

So a sample is the same whatever the batch size, the shard, or the device count.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def randn_per_sample(shape: tuple[int, ...], gens: list[torch.Generator]) -> torch.Tensor:
    """One (C, H, W) draw from each sample's own generator, stacked to (B, C, H, W)."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens])

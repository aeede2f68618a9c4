"""Per-sample random streams: an image's noise depends on (seed, sample index, purpose) only.

So a sample is the same whatever the batch size, the shard, or the device count, and the
calibration trajectories can never reuse the evaluation noise: each purpose other than
evaluation appends a non-zero tag word to the entropy (``SeedSequence`` pads entropy with zero
words, so an untagged [seed, index] and a tagged [seed, index, tag, ...] always differ in the
third word). Seed and index must fit in one 32-bit word each, or a large seed could spill into
the next word and alias another (seed, index) pair.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_SEED = 2**32 - 1
# purpose -> tag words appended to [seed, index]; "sample" (evaluation) has none, for stable image streams
PURPOSES = {"sample": (), "calib": (0x43414C42,)}  # "CALB"


def stream_words(seed: int, index: int, purpose: str = "sample", step: int | None = None) -> list[int]:
    """The entropy words of one sample's stream; ``step`` (>= 0) gives a fresh stream per sampling step."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed {seed} is out of range: use 0..{MAX_SEED}")
    if not 0 <= int(index) <= MAX_SEED:
        raise ValueError(f"sample index {index} is out of range: use 0..{MAX_SEED}")
    if purpose not in PURPOSES:
        raise ValueError(f"unknown noise purpose '{purpose}' (use one of {sorted(PURPOSES)})")
    words = [int(seed), int(index), *PURPOSES[purpose]]
    if step is not None:
        if purpose == "sample":
            raise ValueError("per-step streams exist for calibration only")
        words.append(int(step) + 1)  # + 1: never a zero word, which SeedSequence padding could alias
    return words


def sample_seed(seed: int, index: int, purpose: str = "sample", step: int | None = None) -> int:
    words = stream_words(seed, index, purpose, step)
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def generators(
    seed: int, indices: range | list[int], purpose: str = "sample", step: int | None = None
) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, i, purpose, step)) for i in indices]


def randn_per_sample(shape: tuple[int, ...], gens: list[torch.Generator]) -> torch.Tensor:
    """One (C, H, W) draw from each sample's own generator, stacked to (B, C, H, W)."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens])

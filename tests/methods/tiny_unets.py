"""The tiny random-weight UNet2DModel the method tests share (2 levels, attention at the lower one)."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    ).eval().requires_grad_(False)

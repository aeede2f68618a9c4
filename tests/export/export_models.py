"""Small quantized UNets for the export tests: fake-quant models with and without per-step tables."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from tfmq_exp.quant import QuantizerSpec, QuantRecipe, quantize
from tfmq_exp.quant.quantizer import UniformQuantizer

N_STEPS = 4


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    return unet.eval().requires_grad_(False)


def quantize_rtn(unet: torch.nn.Module, w_bits: int, a_bits: int = 8, shape=(3, 8, 8), tables: str | bool = False):
    """Round-to-nearest PTQ on random calibration inputs; ``tables`` adds per-step activation tables
    derived from the one range: scales and zero points that differ per step (what FSC produces), or
    with ``tables="scale"`` scales that differ and one zero point."""
    recipe = QuantRecipe(weight=QuantizerSpec(n_bits=w_bits, per_channel=True), act=QuantizerSpec(n_bits=a_bits))
    gen = torch.Generator().manual_seed(1)

    def loop(m):
        for t in (900, 500, 100):
            m(torch.randn(4, *shape, generator=gen), torch.full((4,), t))

    quantize(unet, recipe, loop)
    if tables:
        for q in unet.modules():
            if isinstance(q, UniformQuantizer) and q.enabled and not q.per_channel:
                i = torch.arange(N_STEPS, dtype=torch.float32)
                scale = q.scale.reshape(()) * (0.8 + 0.15 * i)
                lo = -q.scale.reshape(()) * q.zero_point.reshape(())  # the range's low end
                zp = torch.clamp(torch.round(-lo / scale) + i - 1, 0, 2**q.n_bits - 1)
                if tables == "scale":
                    zp = q.zero_point.reshape(()).expand(N_STEPS).clone()
                q.set_step_tables(scale, zp)
    return unet

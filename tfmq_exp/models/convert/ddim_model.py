"""ermongroup/ddim ``models.diffusion.Model`` (the DDPM CIFAR-10 network) -> ``UNet2DModel``.

Driven by the ``model`` / ``data`` sections of ddim's ``configs/cifar10.yml``. What differs
from the LDM UNet and how it is expressed in diffusers terms:

* ``get_timestep_embedding`` is ``[sin, cos]`` with frequencies ``exp(-ln(1e4) i / (half-1))``:
  ``flip_sin_to_cos=False``, ``freq_shift=1``;
* GroupNorm eps 1e-6 everywhere; single-head attention with 1x1-conv q/k/v/proj_out;
* downsampling pads (0, 1, 0, 1) and convolves with stride 2 and no padding: ``downsample_padding=0``;
* ``attn_resolutions`` are feature-map sizes (16 = the 16x16 level), not downsampling factors;
* ``up[i]`` holds level ``i`` (the list is built in reverse), diffusers ``up_blocks[0]`` the deepest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tfmq_exp.models.convert.keymap import ConversionError, KeyMap, attention_from_convs, resnet, shapes_of

RESBLOCK = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time_emb_proj": "temb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}


def _model_params(config: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    model = dict(config["model"])
    resolution = int(config["data"]["image_size"])
    if model.get("type", "simple") != "simple":
        raise ConversionError(f"ddim model.type '{model.get('type')}' is not supported (only 'simple')")
    if not model.get("resamp_with_conv", True):
        raise ConversionError("ddim model.resamp_with_conv=false is not supported")
    return model, resolution


def diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``UNet2DModel`` config for a ddim config dict (``model``, ``data`` sections)."""
    model, res = _model_params(config)
    mult = list(model["ch_mult"])
    attn = set(model["attn_resolutions"])
    has_attn = [res // 2**i in attn for i in range(len(mult))]
    return {
        "sample_size": res,
        "in_channels": model["in_channels"],
        "out_channels": model["out_ch"],
        "block_out_channels": [model["ch"] * m for m in mult],
        "layers_per_block": model["num_res_blocks"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "attention_head_dim": None,  # one head as wide as the block
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "dropout": model.get("dropout", 0.0),
    }


def build(config: Mapping[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**diffusers_config(config))


def convert(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], target_shapes=None) -> dict:
    """Map a ddim ``Model`` state dict (no prefix) to ``UNet2DModel`` keys."""
    model, res = _model_params(config)
    levels = len(model["ch_mult"])
    nrb = model["num_res_blocks"]
    attn = set(model["attn_resolutions"])
    m = KeyMap(state, "ddim Model")
    m.layer("conv_in", "conv_in")
    m.layer("time_embedding.linear_1", "temb.dense.0")
    m.layer("time_embedding.linear_2", "temb.dense.1")
    for i in range(levels):
        for j in range(nrb):
            resnet(m, f"down_blocks.{i}.resnets.{j}", f"down.{i}.block.{j}", RESBLOCK)
            if res // 2**i in attn:
                attention_from_convs(m, f"down_blocks.{i}.attentions.{j}", f"down.{i}.attn.{j}", "q", "k", "v", "norm",
                                     "proj_out")
        if i != levels - 1:
            m.layer(f"down_blocks.{i}.downsamplers.0.conv", f"down.{i}.downsample.conv")
    resnet(m, "mid_block.resnets.0", "mid.block_1", RESBLOCK)
    attention_from_convs(m, "mid_block.attentions.0", "mid.attn_1", "q", "k", "v", "norm", "proj_out")
    resnet(m, "mid_block.resnets.1", "mid.block_2", RESBLOCK)
    for k, i in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            resnet(m, f"up_blocks.{k}.resnets.{j}", f"up.{i}.block.{j}", RESBLOCK)
            if res // 2**i in attn:
                attention_from_convs(m, f"up_blocks.{k}.attentions.{j}", f"up.{i}.attn.{j}", "q", "k", "v", "norm",
                                     "proj_out")
        if i != 0:
            m.layer(f"up_blocks.{k}.upsamplers.0.conv", f"up.{i}.upsample.conv")
    m.layer("conv_norm_out", "norm_out")
    m.layer("conv_out", "conv_out")
    if target_shapes is None:
        with torch.device("meta"):
            target_shapes = shapes_of(build(config))
    return m.finish(target_shapes)

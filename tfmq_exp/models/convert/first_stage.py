"""CompVis first-stage autoencoders (``VQModel``/``VQModelInterface``, ``AutoencoderKL``) -> diffusers.

Both share the taming ``Encoder``/``Decoder`` (GroupNorm eps 1e-6, single-head mid-block
attention with 1x1-conv q/k/v, downsampling by (0, 1, 0, 1) padding and a stride-2 conv, no
time embedding). Semantics kept by the diffusers classes, checked against the original outputs:

* ``VQModel.encode`` returns the pre-quantisation latent (encoder -> quant_conv), like
  ``VQModelInterface.encode``; ``VQModel.decode(z)`` quantizes first, as LDM's
  ``decode_first_stage`` does; ``decode(z, force_not_quantize=True)`` skips the codebook (the
  original ``VQModel.decode``).
* ``AutoencoderKL``: moments -> mean and log-variance clamped to [-30, 20], std = exp(logvar / 2);
  diffusers' one ``quant_conv`` needs ``embed_dim == z_channels`` (true for kl-f8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tfmq_exp.models.convert.keymap import ConversionError, KeyMap, attention_from_convs, resnet, shapes_of

RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}


def _ddconfig(params: Mapping[str, Any]) -> dict[str, Any]:
    dd = dict(params["ddconfig"])
    if dd.get("attn_resolutions"):
        raise ConversionError("first stage ddconfig.attn_resolutions must be empty (as vq-f4 and kl-f8)")
    if dd.get("resamp_with_conv", True) is False:
        raise ConversionError("first stage ddconfig.resamp_with_conv=false is not supported")
    return dd


def _common(dd: Mapping[str, Any]) -> dict[str, Any]:
    n = len(dd["ch_mult"])
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "sample_size": dd["resolution"],
        "norm_num_groups": 32,
    }


def diffusers_config(params: Mapping[str, Any], kind: str, scale_factor: float = 1.0) -> dict[str, Any]:
    """Config of ``VQModel`` (``kind='vq'``) or ``AutoencoderKL`` (``kind='kl'``)."""
    dd = _ddconfig(params)
    cfg = _common(dd)
    cfg["scaling_factor"] = float(scale_factor)
    if kind == "vq":
        if dd.get("double_z", False):
            raise ConversionError("a VQ first stage must have ddconfig.double_z=false")
        cfg.update(num_vq_embeddings=params["n_embed"], vq_embed_dim=params["embed_dim"])
    elif kind == "kl":
        if not dd.get("double_z", True):
            raise ConversionError("a KL first stage must have ddconfig.double_z=true")
        if params["embed_dim"] != dd["z_channels"]:
            raise ConversionError("a KL first stage with embed_dim != z_channels is not supported by AutoencoderKL")
    else:
        raise ValueError(kind)
    return cfg


def build(params: Mapping[str, Any], kind: str, scale_factor: float = 1.0) -> torch.nn.Module:
    from diffusers import AutoencoderKL, VQModel

    cls = VQModel if kind == "vq" else AutoencoderKL
    return cls(**diffusers_config(params, kind, scale_factor))


def convert(state: Mapping[str, torch.Tensor], params: Mapping[str, Any], kind: str, target_shapes=None) -> dict:
    """Map a first-stage state dict (``first_stage_model.`` stripped) to diffusers keys.

    ``loss.*`` entries (standalone first-stage checkpoints keep the training loss) are ignored.
    """
    dd = _ddconfig(params)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    n = len(dd["ch_mult"])
    nrb = dd["num_res_blocks"]
    m = KeyMap(state, f"{kind.upper()} first stage")
    for part in ("encoder", "decoder"):
        m.layer(f"{part}.conv_in", f"{part}.conv_in")
        resnet(m, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", RESBLOCK)
        attention_from_convs(m, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "q", "k", "v", "norm",
                             "proj_out")
        resnet(m, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", RESBLOCK)
        m.layer(f"{part}.conv_norm_out", f"{part}.norm_out")
        m.layer(f"{part}.conv_out", f"{part}.conv_out")
    for i in range(n):
        for j in range(nrb):
            resnet(m, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", RESBLOCK)
        if i != n - 1:
            m.layer(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
    for k, i in enumerate(reversed(range(n))):
        for j in range(nrb + 1):
            resnet(m, f"decoder.up_blocks.{k}.resnets.{j}", f"decoder.up.{i}.block.{j}", RESBLOCK)
        if i != 0:
            m.layer(f"decoder.up_blocks.{k}.upsamplers.0.conv", f"decoder.up.{i}.upsample.conv")
    m.layer("quant_conv", "quant_conv")
    m.layer("post_quant_conv", "post_quant_conv")
    if kind == "vq":
        m.copy("quantize.embedding.weight", "quantize.embedding.weight")
    if target_shapes is None:
        with torch.device("meta"):
            target_shapes = shapes_of(build(params, kind))
    return m.finish(target_shapes)

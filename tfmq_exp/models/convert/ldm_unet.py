"""CompVis ``openaimodel.UNetModel`` (LDM, Stable Diffusion v1) -> diffusers UNet.

The original ``unet_config.params`` decide everything:

* without ``use_spatial_transformer`` the UNet has ``AttentionBlock`` s and becomes a
  ``UNet2DModel``; with it, ``SpatialTransformer`` s with cross-attention and it becomes a
  ``UNet2DConditionModel`` (the class embedder or CLIP states enter as ``encoder_hidden_states``);
* ``timestep_embedding`` is ``[cos, sin]`` with frequencies ``exp(-ln(1e4) i / half)``:
  ``flip_sin_to_cos=True``, ``freq_shift=0``;
* ``AttentionBlock`` keeps one ``qkv`` Conv1d whose output channels are laid out per head as
  ``[q, k, v]`` (``QKVAttentionLegacy``): it is split head by head into ``to_q/to_k/to_v``;
* heads: ``num_head_channels`` fixes the width of a head, else ``num_heads`` fixes their number
  (``legacy`` changes the spatial-transformer head width only); ``UNet2DModel`` takes one head
  width for all levels, so a fixed head count (LSUN-Churches: 8) is set on each attention after
  construction;
* ``use_scale_shift_norm`` -> ``resnet_time_scale_shift='scale_shift'``; ``resblock_updown``
  -> resnet down/up samplers (avg-pool / nearest inside a ResBlock).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tfmq_exp.models.convert.keymap import ConversionError, KeyMap, resnet, shapes_of, squeeze_1x1

RESBLOCK = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


@dataclass(frozen=True)
class UNetParams:
    """``UNetModel.__init__`` arguments that shape the network (defaults as the original)."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    dropout: float = 0.0
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    num_heads: int = -1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    n_embed: int | None = None
    legacy: bool = True

    @classmethod
    def from_config(cls, params: Mapping[str, Any]) -> UNetParams:
        ignored = {"use_checkpoint", "use_fp16", "num_heads_upsample", "use_new_attention_order"}
        known = set(cls.__dataclass_fields__)
        unknown = set(params) - known - ignored
        if unknown:
            raise ConversionError(f"unet_config.params: unsupported keys {sorted(unknown)}")
        if params.get("use_new_attention_order"):
            raise ConversionError("unet_config.params: use_new_attention_order=True is not supported")
        if params.get("num_heads_upsample", -1) not in (-1, params.get("num_heads", -1)):
            raise ConversionError("unet_config.params: num_heads_upsample different from num_heads is not supported")
        kw = {k: v for k, v in params.items() if k in known}
        for key in ("attention_resolutions", "channel_mult"):
            if key in kw:
                kw[key] = tuple(kw[key])
        p = cls(**kw)
        if p.dims != 2 or not p.conv_resample or p.num_classes is not None or p.n_embed is not None:
            raise ConversionError(
                "unet_config.params: only 2-D UNets with conv resampling, no num_classes and no n_embed are supported"
            )
        if p.use_spatial_transformer and p.resblock_updown:
            raise ConversionError("unet_config.params: resblock_updown with spatial transformers is not supported")
        if p.num_heads == -1 and p.num_head_channels == -1:
            raise ConversionError("unet_config.params: set num_heads or num_head_channels")
        return p

    @property
    def channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def has_attention(self, level: int) -> bool:
        return 2**level in self.attention_resolutions

    def heads(self, ch: int) -> int:
        """Number of attention heads at width ``ch``, as the original constructor computes it."""
        if self.num_head_channels == -1:
            return self.num_heads
        return ch // self.num_head_channels

    def head_dim(self, ch: int) -> int:
        heads = self.heads(ch)
        if self.num_head_channels == -1 or (self.legacy and self.use_spatial_transformer):
            return ch // heads
        return self.num_head_channels


def diffusers_config(p: UNetParams) -> tuple[str, dict[str, Any]]:
    """The diffusers class name and its config for these original params."""
    levels = range(len(p.channel_mult))
    last = len(p.channel_mult) - 1
    common = {
        "sample_size": p.image_size,
        "in_channels": p.in_channels,
        "out_channels": p.out_channels,
        "block_out_channels": p.channels,
        "layers_per_block": p.num_res_blocks,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if p.use_scale_shift_norm else "default",
        "dropout": p.dropout,
    }
    if p.use_spatial_transformer:
        for ch in p.channels:
            if p.heads(ch) * p.head_dim(ch) != ch:
                raise ConversionError(f"unet_config.params: heads x head width != {ch} channels is not supported")
        down = ["CrossAttnDownBlock2D" if p.has_attention(i) else "DownBlock2D" for i in levels]
        up = ["CrossAttnUpBlock2D" if p.has_attention(i) else "UpBlock2D" for i in reversed(levels)]
        return "UNet2DConditionModel", {
            **common,
            "down_block_types": down,
            "up_block_types": up,
            "cross_attention_dim": p.context_dim,
            # diffusers names the number of heads "attention_head_dim" in this class
            "attention_head_dim": [p.heads(ch) for ch in p.channels],
            "transformer_layers_per_block": p.transformer_depth,
            "use_linear_projection": False,
        }
    if p.resblock_updown:
        down = [
            "AttnDownBlock2D" if p.has_attention(i) else ("ResnetDownsampleBlock2D" if i != last else "DownBlock2D")
            for i in levels
        ]
        up = [
            "AttnUpBlock2D" if p.has_attention(i) else ("ResnetUpsampleBlock2D" if i != 0 else "UpBlock2D")
            for i in reversed(levels)
        ]
    else:
        down = ["AttnDownBlock2D" if p.has_attention(i) else "DownBlock2D" for i in levels]
        up = ["AttnUpBlock2D" if p.has_attention(i) else "UpBlock2D" for i in reversed(levels)]
    return "UNet2DModel", {
        **common,
        "down_block_types": down,
        "up_block_types": up,
        "downsample_type": "resnet" if p.resblock_updown else "conv",
        "upsample_type": "resnet" if p.resblock_updown else "conv",
        "attention_head_dim": p.num_head_channels if p.num_head_channels != -1 else None,
        # the original AttentionBlock always has its GroupNorm (diffusers drops the mid-block
        # attention norm under scale_shift unless the group count is given)
        "attn_norm_num_groups": 32,
    }


def build(params: Mapping[str, Any]) -> torch.nn.Module:
    """An empty diffusers UNet for these original params (on the current default device)."""
    import diffusers

    p = UNetParams.from_config(params)
    cls_name, config = diffusers_config(p)
    unet = getattr(diffusers, cls_name)(**config)
    if cls_name == "UNet2DModel" and p.num_head_channels == -1:
        _set_head_counts(unet, p)
    return unet


def _set_head_counts(unet: torch.nn.Module, p: UNetParams) -> None:
    """Give every attention ``p.num_heads`` heads (UNet2DModel only takes one head width)."""
    from diffusers.models.attention_processor import Attention

    for module in unet.modules():
        if isinstance(module, Attention):
            ch = module.to_q.out_features
            module.heads = p.num_heads
            module.scale = (ch // p.num_heads) ** -0.5


def _split_qkv(m: KeyMap, target: str, source: str, ch: int, heads: int) -> None:
    """``qkv`` [3C, C, 1] in per-head [q, k, v] order -> to_q/to_k/to_v [C, C]."""
    w = m.take(f"{source}.qkv.weight")
    b = m.take(f"{source}.qkv.bias")
    dh = ch // heads
    w = w.reshape(heads, 3, dh, w.shape[1])
    b = b.reshape(heads, 3, dh)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        m.put(f"{target}.{name}.weight", w[:, i].reshape(ch, -1))
        m.put(f"{target}.{name}.bias", b[:, i].reshape(ch))


def _attention(m: KeyMap, p: UNetParams, target: str, source: str, ch: int) -> None:
    if p.use_spatial_transformer:
        m.subtree(target, source)  # SpatialTransformer and Transformer2DModel share their key names
        return
    m.layer(f"{target}.group_norm", f"{source}.norm")
    _split_qkv(m, target, source, ch, p.heads(ch))
    m.layer(f"{target}.to_out.0", f"{source}.proj_out", squeeze_1x1)


def convert(state: Mapping[str, torch.Tensor], params: Mapping[str, Any], target_shapes=None) -> dict:
    """Map an original UNet state dict (``model.diffusion_model.`` stripped) to diffusers keys.

    ``target_shapes`` (the diffusers module's state-dict shapes) defaults to a meta-device build.
    """
    p = UNetParams.from_config(params)
    m = KeyMap(state, "LDM UNet")
    m.layer("conv_in", "input_blocks.0.0")
    m.layer("time_embedding.linear_1", "time_embed.0")
    m.layer("time_embedding.linear_2", "time_embed.2")
    chans = p.channels
    last = len(chans) - 1
    idx = 1
    for level, ch in enumerate(chans):
        for j in range(p.num_res_blocks):
            resnet(m, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{idx}.0", RESBLOCK)
            if p.has_attention(level):
                _attention(m, p, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{idx}.1", ch)
            idx += 1
        if level != last:
            if p.resblock_updown:
                resnet(m, f"down_blocks.{level}.downsamplers.0", f"input_blocks.{idx}.0", RESBLOCK)
            else:
                m.layer(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{idx}.0.op")
            idx += 1
    resnet(m, "mid_block.resnets.0", "middle_block.0", RESBLOCK)
    _attention(m, p, "mid_block.attentions.0", "middle_block.1", chans[-1])
    resnet(m, "mid_block.resnets.1", "middle_block.2", RESBLOCK)
    idx = 0
    for k, level in enumerate(reversed(range(len(chans)))):
        for j in range(p.num_res_blocks + 1):
            resnet(m, f"up_blocks.{k}.resnets.{j}", f"output_blocks.{idx}.0", RESBLOCK)
            sub = 1
            if p.has_attention(level):
                _attention(m, p, f"up_blocks.{k}.attentions.{j}", f"output_blocks.{idx}.1", chans[level])
                sub = 2
            if level and j == p.num_res_blocks:
                if p.resblock_updown:
                    resnet(m, f"up_blocks.{k}.upsamplers.0", f"output_blocks.{idx}.{sub}", RESBLOCK)
                else:
                    m.layer(f"up_blocks.{k}.upsamplers.0.conv", f"output_blocks.{idx}.{sub}.conv")
            idx += 1
    m.layer("conv_norm_out", "out.0")
    m.layer("conv_out", "out.2")
    if target_shapes is None:
        with torch.device("meta"):
            target_shapes = shapes_of(build(params))
    return m.finish(target_shapes)

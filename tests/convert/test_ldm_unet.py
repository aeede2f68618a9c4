"""openaimodel UNetModel -> diffusers, against the outputs the original code computed."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from original_fixtures import close, original_config, tiny

from tfmq_exp.models.convert import class_embedder, ldm_unet
from tfmq_exp.models.convert.keymap import ConversionError, load_converted, strip_prefix

PREFIX = "model.diffusion_model."


def _unet(family: str, params=None):
    state, io, meta = tiny(family)
    params = params or original_config(meta)
    unet = load_converted(ldm_unet.build(params), ldm_unet.convert(strip_prefix(state, PREFIX), params))
    return unet.eval(), io, meta, state


def test_unconditional_unet_reproduces_original_outputs():
    unet, io, _, _ = _unet("ldm_unet_A")
    assert isinstance(unet, UNet2DModel)
    with torch.no_grad():
        out = unet(io["x"], io["timesteps"]).sample
    close(out, io["out"])


def test_head_split_matters():
    """Same weights read with 2 heads instead of 4 (num_head_channels 32, not 16): far off."""
    _, io, meta, _ = _unet("ldm_unet_A")
    params = {**original_config(meta), "num_head_channels": 32}
    unet, _, _, _ = _unet("ldm_unet_A", params)
    with torch.no_grad():
        out = unet(io["x"], io["timesteps"]).sample
    assert (out - io["out"]).abs().max() > 1e-2


def test_conditional_unet_with_class_embedder_reproduces_original_outputs():
    unet, io, meta, state = _unet("ldm_cond_unet_A")
    assert isinstance(unet, UNet2DConditionModel)
    cs_params = original_config(meta, "cond_stage_config")["params"]
    emb = class_embedder.build(cs_params)
    load_converted(emb, class_embedder.convert(strip_prefix(state, meta["cond_stage_key_prefix"]), cs_params))
    with torch.no_grad():
        context = emb(io["class_label"])
        out = unet(io["x"], io["timesteps"], encoder_hidden_states=context).sample
    assert context.shape == (2, 1, 32) and emb.null_class == 10
    close(context, io["context"])
    close(out, io["out"])


def test_timestep_embedding_is_cos_sin_with_shift_0():
    unet, _, _, _ = _unet("ldm_unet_A")
    t = torch.tensor([17, 613])
    half = 16  # model_channels 32
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    args = t[:, None].float() * freqs[None]
    close(unet.time_proj(t), torch.cat([torch.cos(args), torch.sin(args)], dim=1))


def test_a_missing_key_is_named():
    state, _, meta = tiny("ldm_unet_A")
    unet_state = strip_prefix(state, PREFIX)
    del unet_state["middle_block.1.qkv.bias"]
    with pytest.raises(ConversionError, match=r"'middle_block.1.qkv.bias' is missing"):
        ldm_unet.convert(unet_state, original_config(meta))


def test_a_leftover_key_is_reported():
    state, _, meta = tiny("ldm_unet_A")
    unet_state = strip_prefix(state, PREFIX)
    unet_state["middle_block.9.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"1 original keys not used \(first: middle_block.9.weight\)"):
        ldm_unet.convert(unet_state, original_config(meta))


def test_unsupported_params_are_refused():
    with pytest.raises(ConversionError, match="num_classes"):
        ldm_unet.UNetParams.from_config({"image_size": 8, "in_channels": 3, "model_channels": 32, "out_channels": 3,
                                          "num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1,
                                          "num_classes": 10})

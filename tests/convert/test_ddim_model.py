"""ermongroup/ddim Model -> UNet2DModel, against the outputs the original code computed."""

from __future__ import annotations

import torch
from original_fixtures import close, original_config, tiny

from tfmq_exp.models.convert import ddim_model
from tfmq_exp.models.convert.keymap import load_converted


def _unet():
    state, io, meta = tiny("ddim_cifar_A")
    cfg = original_config(meta)
    return load_converted(ddim_model.build(cfg), ddim_model.convert(state, cfg)).eval(), io


def test_ddim_model_reproduces_original_outputs():
    unet, io = _unet()
    assert io["timesteps"].dtype == torch.float32
    with torch.no_grad():
        out = unet(io["x"], io["timesteps"]).sample
    close(out, io["out"])


def test_timestep_embedding_is_sin_cos_over_half_minus_one():
    unet, _ = _unet()
    t = torch.tensor([10.0, 760.0])
    half = 16  # ch 32
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / (half - 1))
    args = t[:, None] * freqs[None]
    close(unet.time_proj(t), torch.cat([torch.sin(args), torch.cos(args)], dim=1))

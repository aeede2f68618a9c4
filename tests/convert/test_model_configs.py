"""The seven paper model options compose, carry the original params and build the right modules."""

from __future__ import annotations

import pytest
import torch
from original_fixtures import fullsize

from tfmq_exp.config import validate_config
from tfmq_exp.models.loader import load_model
from tfmq_exp.models.original import OriginalModel

# model option -> (UNet listing, first-stage listing, diffusers UNet, latent C x H, scale factor)
MODELS = {
    "ldm_bedroom": ("lsun_bedrooms-ldm-vq-4_unet", "vq-f4_first_stage", "UNet2DModel", (3, 64), 1.0),
    "ldm_churches": ("lsun_churches-ldm-kl-8_unet", "kl-f8_first_stage", "UNet2DModel", (4, 32), 1.0),
    "ldm_celebahq": ("celebahq-ldm-vq-4_unet", "vq-f4_first_stage", "UNet2DModel", (3, 64), 1.0),
    "ldm_ffhq": ("ffhq-ldm-vq-4_unet", "vq-f4_first_stage", "UNet2DModel", (3, 64), 1.0),
    "ldm_cin256": ("cin256-v2_unet", "vq-f4_first_stage", "UNet2DConditionModel", (3, 64), 1.0),
    "sd14": ("sd-v1_unet", "kl-f8_first_stage", "UNet2DConditionModel", (4, 64), 0.18215),
    "ddim_cifar10": ("ddim_cifar10", None, "UNet2DModel", (3, 32), 1.0),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_option_matches_the_original_config_and_builds(make_cfg, name):
    unet_listing, fs_listing, unet_cls, (channels, size), scale = MODELS[name]
    full = make_cfg(f"model={name}")
    validate_config(full)  # the app's range and path checks
    cfg = full.model
    assert cfg.source == "original" and cfg.unet_class == unet_cls
    assert (cfg.channels, cfg.image_size) == (channels, size)
    params = cfg.original.params
    unet = fullsize(unet_listing)
    if cfg.original.kind == "ddim":
        assert params == unet["constructor_params"]
    else:
        assert params.unet_config.params == unet["constructor_params"]
        fs = fullsize(fs_listing)["constructor_params"]
        for key in ("embed_dim", "ddconfig"):
            assert params.first_stage_config.params[key] == fs[key]
    with torch.device("meta"):
        model = load_model(cfg, weights=False)
    assert isinstance(model, OriginalModel)
    assert type(model.unet).__name__ == unet_cls
    assert sum(p.numel() for p in model.unet.parameters()) == unet["num_parameters"]
    assert model.scale_factor == scale
    if fs_listing:
        assert sum(p.numel() for p in model.first_stage.parameters()) == fullsize(fs_listing)["num_parameters"]
    else:
        assert model.first_stage is None


def test_cin256_brings_its_class_embedder_and_sd_its_text_encoder(make_cfg):
    with torch.device("meta"):
        cin = load_model(make_cfg("model=ldm_cin256").model, weights=False)
        sd = load_model(make_cfg("model=sd14").model, weights=False)
    assert type(cin.cond_stage).__name__ == "ClassEmbedder" and cin.cond_stage.null_class == 1000
    assert type(sd.cond_stage).__name__ == "CLIPTextModel" and sd.text_encoder is sd.cond_stage
    assert sd.class_embedder is None and sd.scaling_factor == 0.18215
    assert sd.cond_stage.config.hidden_size == 768 and sd.cond_stage.config.max_position_embeddings == 77


def test_paths_models_is_the_search_folder(make_cfg, tmp_path):
    cfg = make_cfg("model=ldm_bedroom", f"paths.models={tmp_path}").model
    assert cfg.models_dir == str(tmp_path)
    assert "ldm/lsun_beds256/model.ckpt" in cfg.original.files


def test_schedules_follow_the_original_yaml(make_cfg):
    with torch.device("meta"):
        churches = load_model(make_cfg("model=ldm_churches").model, weights=False).scheduler_config
        cifar = load_model(make_cfg("model=ddim_cifar10").model, weights=False).scheduler_config
    assert churches == {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.0015,
                        "beta_end": 0.0155, "prediction_type": "epsilon"}
    assert cifar == {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                     "beta_end": 0.02, "prediction_type": "epsilon"}

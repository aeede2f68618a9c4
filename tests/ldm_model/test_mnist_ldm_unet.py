"""The class-conditional latent UNet: shapes, the class entering through cross-attention only, the loader hook."""

from __future__ import annotations

import pytest
import torch

from tfmq_exp.errors import UserError
from tfmq_exp.models.mnist_ldm import ClassEmbedder, load_mnist_ldm


def test_forward_shape_and_class_context_changes_output(ldm_cfg):
    unet, _, emb, _, _ = load_mnist_ldm(ldm_cfg)
    z = torch.randn(4, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 300, 600, 900])
    with torch.no_grad():
        a = unet(z, t, encoder_hidden_states=emb(torch.tensor([1, 1, 1, 1]))).sample
        b = unet(z, t, encoder_hidden_states=emb(torch.tensor([7, 7, 7, 7]))).sample
        u = unet(z, t, encoder_hidden_states=emb(torch.full((4,), emb.null_class))).sample
    assert a.shape == (4, 4, 7, 7)
    assert (a - b).abs().mean() > 1e-2 and (a - u).abs().mean() > 1e-2
    # no class embedding in the time embedding: the context is the only way in
    assert unet.class_embedding is None and unet.config.num_class_embeds is None


def test_class_embedder_gives_one_context_token_and_checks_ids():
    emb = ClassEmbedder(10, 64, null_class=10)
    assert emb(torch.tensor([0, 9, 10])).shape == (3, 1, 64)
    assert emb.embedding.num_embeddings == 11
    with pytest.raises(UserError, match=r"class id out of range: got 0\.\.11"):
        emb(torch.tensor([0, 11]))


def test_load_model_returns_the_latent_unet_with_its_parts(ldm_cfg):
    from tfmq_exp.models.loader import load_model

    m = load_model(ldm_cfg)
    assert type(m.unet).__name__ == "UNet2DConditionModel"
    assert (m.image_size, m.channels) == (7, 4)
    assert type(m.vae).__name__ == "AutoencoderKL" and m.class_embedder.null_class == 10
    assert m.scaling_factor == load_mnist_ldm(ldm_cfg)[3]


def test_mismatched_context_width_is_refused(ldm_cfg):
    from omegaconf import OmegaConf

    from tfmq_exp.models.mnist_ldm import build_parts

    cfg = OmegaConf.merge(ldm_cfg, {"class_embedder": {"embed_dim": 32}})
    with pytest.raises(UserError, match="cross_attention_dim .* must equal model.class_embedder.embed_dim"):
        build_parts(cfg)

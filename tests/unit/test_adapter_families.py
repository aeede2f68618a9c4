"""One adapter per architecture family behind one interface: selection, the family check, and what differs."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from tfmq_exp.models.adapters import ADAPTERS, UNet2DAdapter, UNet2DConditionAdapter, UNetAdapter, adapter_for

torch.set_num_threads(1)


def unet2d() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()


def cond() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2).eval()


def test_the_family_follows_the_class_and_a_wrong_family_is_named():
    assert type(adapter_for(unet2d())) is UNet2DAdapter
    assert type(adapter_for(cond())) is UNet2DConditionAdapter
    assert sorted(ADAPTERS) == ["unet2d", "unet2d_condition"]
    with pytest.raises(ValueError, match="model.family=unet2d but the model is a UNet2DConditionModel; "
                                         "set model.family=unet2d_condition"):
        adapter_for(cond(), "unet2d")
    with pytest.raises(ValueError, match="unknown architecture family 'dit'"):
        adapter_for(unet2d(), "dit")
    with pytest.raises(NotImplementedError, match="no architecture adapter for Linear"):
        adapter_for(nn.Linear(2, 2))


@pytest.mark.parametrize("build", [unet2d, cond])
def test_every_family_answers_the_whole_interface(build):
    unet = build()
    ad = adapter_for(unet)
    for name in ("example_inputs", "time_embedding_output", "tfmq_fp_attentions"):
        assert getattr(type(ad), name) is not getattr(UNetAdapter, name), f"{type(ad).__name__} lacks {name}"
    kw = ad.example_inputs(batch_size=2)
    with torch.no_grad():
        assert unet(**kw).sample.shape == kw["sample"].shape
    emb = ad.time_embedding_output(kw["timestep"])
    assert emb.shape == (2, unet.time_embedding.linear_2.out_features)
    assert ad.describe()["family"] == ad.family


def test_what_tfmq_keeps_in_fp_differs_by_family():
    # UNet2DModel: the stand-alone attention blocks (LDM Conv1d qkv/proj_out); cross-attention models: none
    plain, conditional = adapter_for(unet2d()), adapter_for(cond())
    assert plain.tfmq_fp_attentions() == ["down_blocks.1.attentions.0", "up_blocks.0.attentions.0",
                                          "up_blocks.0.attentions.1", "mid_block.attentions.0"]
    assert conditional.tfmq_fp_attentions() == []
    skipped = {r.pattern for r in conditional.fp_rules("tfmq") if r.skip}
    assert not any("attn" in s for s in skipped)
    assert any(".attn2.to_k" in n for n, _ in conditional.unet.named_modules())  # cross-attention stays quantized


def test_the_context_is_not_part_of_the_tib():
    ad = adapter_for(cond())
    emb = ad.time_embedding_output(torch.tensor([5, 700]))
    kw = ad.example_inputs(batch_size=2)
    kw["timestep"] = torch.tensor([5, 700])
    seen: list[torch.Tensor] = []
    res = ad.unet.down_blocks[0].resnets[0]
    h = res.time_emb_proj.register_forward_hook(lambda _m, a, _o: seen.append(a[0]) and None)
    with torch.no_grad():
        ad.unet(**kw)
        kw["encoder_hidden_states"] = kw["encoder_hidden_states"] * 3.0  # another context: the same emb
        ad.unet(**kw)
    h.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert torch.allclose(seen[1], res.nonlinearity(emb), atol=1e-6)

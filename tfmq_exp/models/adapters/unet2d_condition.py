"""Adapter for diffusers ``UNet2DConditionModel``: transformer blocks with self- and cross-attention.

LDM-4 ImageNet (class context through cross-attention), Stable Diffusion v1.4 (CLIP text states) and the
embedded ``mnist_ldm`` convert to this family. Each ``BasicTransformerBlock`` is one reconstruction block;
Q-Diffusion's matmul quantizers go on both its attentions (self: q, k, v from the image tokens; cross:
k, v from the context), with the softmax at 16 bits in the SD recipe (``softmax_bits``, conf/recipe/qdiff/
sd14.yaml). The context itself is an input of the blocks, never part of the TIB (§5.3).

``emb`` adds to UNet2DModel's: ``timestep_cond`` into ``time_embedding``, ``class_embeddings_concat`` and
``time_embed_act``. SDXL/Kandinsky added embeddings (``addition_embed_type``) are not described.
"""

from __future__ import annotations

from typing import Any

import torch

from tfmq_exp.models.adapters.base import UNetAdapter, as_timesteps, example_sample, standalone_attentions


class UNet2DConditionAdapter(UNetAdapter):
    family = "unet2d_condition"
    unet_class = "UNet2DConditionModel"

    @classmethod
    def matches(cls, unet: torch.nn.Module) -> bool:
        return type(unet).__name__ == cls.unet_class or hasattr(unet, "get_time_embed")

    def check_supported(self) -> None:
        kind = getattr(self.unet.config, "addition_embed_type", None)
        if kind is not None:
            raise NotImplementedError(
                f"addition_embed_type={kind!r} (SDXL/Kandinsky added embeddings) is not supported by the "
                "UNet2DConditionModel adapter: its embedding is part of the temporal path"
            )

    def example_inputs(self, batch_size: int = 1) -> dict[str, Any]:
        kw = example_sample(self.unet, batch_size)
        cfg, p = self.unet.config, kw["sample"]
        dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
        if isinstance(dim, list | tuple):
            dim = dim[0]
        kw["encoder_hidden_states"] = torch.randn(batch_size, 2, dim, device=p.device, dtype=p.dtype)
        return kw

    def time_embedding_output(self, timesteps: Any, class_labels: torch.Tensor | None = None,
                              timestep_cond: torch.Tensor | None = None,
                              batch_size: int | None = None) -> torch.Tensor:
        """``emb`` exactly as ``UNet2DConditionModel.forward`` builds it and hands it to every resnet."""
        unet = self.unet
        t = as_timesteps(timesteps, batch_size, unet.device, cond=True)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype), timestep_cond)
        class_embedding = getattr(unet, "class_embedding", None)
        if class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when the UNet has a class embedding")
            if unet.config.class_embed_type == "timestep":
                class_labels = unet.time_proj(class_labels).to(dtype=unet.dtype)
            class_emb = class_embedding(class_labels).to(dtype=unet.dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        elif class_labels is not None:
            raise ValueError("class_labels given but the UNet has no class embedding")
        act = getattr(unet, "time_embed_act", None)
        return act(emb) if act is not None else emb

    def tfmq_fp_attentions(self) -> list[str]:
        """Only stand-alone attentions (rare here): transformer-block projections are nn.Linear in the
        original SD/LDM code too, and TFMQ-DM quantizes them."""
        return standalone_attentions(self.unet)

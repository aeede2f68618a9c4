"""Adapter for diffusers ``UNet2DModel``: pixel or latent UNets conditioned on the timestep (and a class embedding).

DDIM CIFAR-10 and the unconditional LDMs (LSUN, CelebA-HQ, FFHQ) convert to this family. Their attention
blocks are stand-alone diffusers ``Attention`` modules (the LDM ``AttentionBlock`` / DDIM ``AttnBlock``),
each reconstructed as one block. ``emb = time_embedding(time_proj(t))`` (+ the class embedding).
"""

from __future__ import annotations

from typing import Any

import torch

from tfmq_exp.models.adapters.base import UNetAdapter, as_timesteps, example_sample, standalone_attentions


class UNet2DAdapter(UNetAdapter):
    family = "unet2d"
    unet_class = "UNet2DModel"

    def example_inputs(self, batch_size: int = 1) -> dict[str, Any]:
        return example_sample(self.unet, batch_size)

    def time_embedding_output(self, timesteps: Any, class_labels: torch.Tensor | None = None,
                              timestep_cond: torch.Tensor | None = None,
                              batch_size: int | None = None) -> torch.Tensor:
        """``emb`` exactly as ``UNet2DModel.forward`` builds it and hands it to every resnet.

        ``time_embedding(time_proj(t))`` plus ``class_embedding(labels)`` (a "timestep" class embedding
        sees ``time_proj(labels)``), cast to the model's dtype. ``batch_size`` broadcasts a scalar timestep.
        """
        if timestep_cond is not None:
            raise ValueError("timestep_cond is a UNet2DConditionModel input; UNet2DModel has none")
        unet = self.unet
        t = as_timesteps(timesteps, batch_size, unet.device, cond=False)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
        class_embedding = getattr(unet, "class_embedding", None)
        if class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when the UNet has a class embedding")
            if unet.config.class_embed_type == "timestep":
                class_labels = unet.time_proj(class_labels)
            emb = emb + class_embedding(class_labels).to(dtype=unet.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given but the UNet has no class embedding")
        return emb

    def tfmq_fp_attentions(self) -> list[str]:
        """Every stand-alone attention block: TFMQ-DM wraps no Conv1d, so LDM's qkv/proj_out stay FP (§5.1).

        The methods decide by the model's origin (``attention_fp: auto``): DDIM's AttnBlock uses 1x1
        Conv2d projections that TFMQ-DM does wrap, so DDIM-origin models pass ``tfmq_attention_fp=False``.
        """
        return standalone_attentions(self.unet)

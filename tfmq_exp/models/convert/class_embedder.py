"""LDM ``ClassEmbedder`` (cin256-v2's conditioning stage) as a small module of our own.

diffusers has no class for it. The original maps ``batch[key]`` to ``embedding(labels[:, None])``:
one context token per image, ``[B, 1, embed_dim]``, which the UNet's cross-attention reads as
``encoder_hidden_states``. cin256-v2 has 1001 classes: the ImageNet 1000 and the null class 1000
used for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tfmq_exp.errors import UserError
from tfmq_exp.models.convert.keymap import KeyMap, shapes_of


class ClassEmbedder(nn.Module):
    """Class labels [B] -> context [B, 1, embed_dim]."""

    def __init__(self, n_classes: int = 1000, embed_dim: int = 512) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)

    @property
    def null_class(self) -> int:
        """The label used for the unconditional half of guidance (the last one)."""
        return self.embedding.num_embeddings - 1

    @property
    def n_classes(self) -> int:
        """The real classes, without the null class."""
        return self.embedding.num_embeddings - 1

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        n = self.embedding.num_embeddings
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= n):
            raise UserError(
                f"class id out of range: got {class_labels.min().item()}..{class_labels.max().item()}, the model "
                f"knows 0..{n - 2} and the null class {n - 1}. Fix: pass ids in that range."
            )
        return self.embedding(class_labels[:, None])


def build(params: Mapping[str, Any]) -> ClassEmbedder:
    return ClassEmbedder(int(params.get("n_classes", 1000)), int(params["embed_dim"]))


def convert(state: Mapping[str, torch.Tensor], params: Mapping[str, Any], target_shapes=None) -> dict:
    """``cond_stage_model.`` stripped state dict -> :class:`ClassEmbedder` keys (the same name)."""
    m = KeyMap(state, "ClassEmbedder")
    m.copy("embedding.weight", "embedding.weight")
    if target_shapes is None:
        with torch.device("meta"):
            target_shapes = shapes_of(build(params))
    return m.finish(target_shapes)

"""SD v1's text encoder: ``cond_stage_model.transformer.*`` -> transformers ``CLIPTextModel``.

The original ``FrozenCLIPEmbedder`` wraps a transformers ``CLIPTextModel`` (openai CLIP
ViT-L/14), so the checkpoint keys under ``cond_stage_model.transformer.`` are the
``CLIPTextModel`` keys of the transformers version of 2022 (``text_model.*``). transformers 5
dropped that inner ``text_model`` level (its ``from_pretrained`` renames on load), so the prefix
is removed when the module at hand lacks it. Old versions also saved the ``position_ids`` buffer,
which current ones do not keep: it is dropped after checking it is ``0..n-1``.
The tokenizer is not in the checkpoint (openai/clip-vit-large-patch14, see docs/models.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tfmq_exp.models.convert.keymap import ConversionError, KeyMap, shapes_of

# openai/clip-vit-large-patch14, text tower (the FrozenCLIPEmbedder default)
VIT_L14_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
POSITION_IDS = "text_model.embeddings.position_ids"
INNER = "text_model."


def build(config: Mapping[str, Any] | None = None) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**dict(config or VIT_L14_TEXT)))


def convert(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None, target_shapes=None) -> dict:
    """``cond_stage_model.`` stripped state dict (keys ``transformer.text_model.*``) -> CLIPTextModel keys."""
    if target_shapes is None:
        with torch.device("meta"):
            target_shapes = shapes_of(build(config))
    target_shapes = {k: v for k, v in target_shapes.items() if not k.endswith("embeddings.position_ids")}
    state = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
    pos = state.pop(POSITION_IDS, None)
    if pos is not None and pos.device.type != "meta":
        if not torch.equal(pos.reshape(-1).long(), torch.arange(pos.numel())):
            raise ConversionError(f"CLIP text encoder: {POSITION_IDS} is not 0..{pos.numel() - 1}")
    inner = not any(k.startswith(INNER) for k in target_shapes)
    m = KeyMap(state, "CLIP text encoder")
    for key in state:
        m.copy(key[len(INNER) :] if inner and key.startswith(INNER) else key, key)
    return m.finish(target_shapes)

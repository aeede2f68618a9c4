"""SD's text encoder: the checkpoint's 2022 ``cond_stage_model.transformer.text_model.*`` layout."""

from __future__ import annotations

import pytest
import torch

from tfmq_exp.models.convert import clip_text
from tfmq_exp.models.convert.keymap import ConversionError, load_converted, strip_prefix

TINY = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 16, "hidden_act": "quick_gelu"}


def _original_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What FrozenCLIPEmbedder saved: keys under transformer.text_model., position ids included."""
    state = {"cond_stage_model.transformer.text_model." + k: v.clone() for k, v in model.state_dict().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    return state


def test_text_encoder_states_survive_the_conversion():
    torch.manual_seed(0)
    source = clip_text.build(TINY).eval()
    ckpt = _original_checkpoint(source)
    target = load_converted(clip_text.build(TINY), clip_text.convert(strip_prefix(ckpt, "cond_stage_model."), TINY))
    ids = torch.randint(0, 99, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(ids).last_hidden_state, source(ids).last_hidden_state)


def test_shuffled_position_ids_are_refused():
    ckpt = strip_prefix(_original_checkpoint(clip_text.build(TINY)), "cond_stage_model.")
    ckpt["transformer.text_model.embeddings.position_ids"] = torch.arange(16).flip(0)[None]
    with pytest.raises(ConversionError, match="position_ids is not 0..15"):
        clip_text.convert(ckpt, TINY)

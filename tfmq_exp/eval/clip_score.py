"""CLIP score for text-to-image samples.

Convention (the paper's, e.g. 0.3128 for SD): mean over image/caption pairs of
max(cos(image embedding, text embedding), 0) with CLIP ViT-B/32, NOT multiplied by 100
(torchmetrics' CLIPScore is 100x this). Images go through the model's own CLIP image processor.
"""

from __future__ import annotations

import numpy as np
import torch

from tfmq_exp.errors import UserError
from tfmq_exp.eval.images import to_uint8_rgb
from tfmq_exp.progress import progress_bar as tqdm

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def load_clip(name_or_path: str = DEFAULT_CLIP, device: str | torch.device = "cpu"):
    """(model, image_processor, tokenizer) from a local folder or a hub id; UserError if unavailable."""
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
        processor = CLIPProcessor.from_pretrained(name_or_path)
    except Exception as err:
        raise UserError(
            f"cannot load CLIP model '{name_or_path}' ({type(err).__name__}). "
            "Fix: set evaluator.clip_model to a local folder saved with save_pretrained (or go online)."
        ) from err
    return model, processor.image_processor, processor.tokenizer


def clipped_cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """max(cos, 0) per row pair."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return cos.clamp_min(0.0)


@torch.no_grad()
def clip_score(
    images: torch.Tensor | np.ndarray,
    captions: list[str],
    model,
    image_processor,
    tokenizer,
    batch_size: int = 32,
) -> float:
    """Mean clipped cosine similarity between each image and its caption (same order)."""
    rgb = to_uint8_rgb(images)
    if len(rgb) != len(captions):
        raise ValueError(f"{len(rgb)} images but {len(captions)} captions")
    device = next(model.parameters()).device
    max_len = model.config.text_config.max_position_embeddings
    scores = []
    for start in tqdm(range(0, len(rgb), batch_size), desc="CLIP score", leave=False):
        batch = [img.permute(1, 2, 0).cpu().numpy() for img in rgb[start : start + batch_size]]
        pixels = image_processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        text = tokenizer(
            captions[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        out = model(
            input_ids=text["input_ids"].to(device),
            attention_mask=text["attention_mask"].to(device),
            pixel_values=pixels,
        )
        scores.append(clipped_cosine(out.image_embeds, out.text_embeds).cpu())
    return float(torch.cat(scores).mean())

"""What conditional and latent models add to a run: each sample's context, and decoding latents to images.

Contexts are computed once, in full precision, by the model's conditioning stage (a class embedder or a
CLIP text encoder; never quantized) and handed to the sampler as a ``Conditioning``: sample i gets class
``classes[i % len(classes)]`` (so 500 samples of 10 digits give 50 per class), or the i-th of a seeded
choice of prompts. Latent models' samples are decoded by their first stage, in full precision as in the
papers, before grids, metrics and saved samples.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tfmq_exp.diffusion.sampling import Conditioning
from tfmq_exp.errors import UserError


def is_conditional(model: Any) -> bool:
    return type(model.unet).__name__ == "UNet2DConditionModel" or getattr(model, "class_embedder", None) is not None


def read_prompts(path: str | None) -> list[str]:
    """Prompts from a COCO captions JSON (``annotations[].caption``) or a text file (one per line)."""
    if not path:
        raise UserError("this text-conditional model needs prompts. Fix: set dataset.prompts=PATH to a COCO "
                        "captions JSON (annotations[].caption) or a text file with one prompt per line.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"prompt file not found: {p}. Fix: set dataset.prompts to an existing captions JSON or text "
                        "file.")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            prompts = [a["caption"] for a in json.loads(text)["annotations"]]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{p} is not a COCO captions file (no annotations[].caption). Fix: point "
                            "dataset.prompts at captions_*.json or a text file with one prompt per line.") from None
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [q.strip() for q in prompts if q and q.strip()]
    if not prompts:
        raise UserError(f"prompt file {p} holds no prompts. Fix: give a file with at least one caption.")
    return prompts


def choose_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """A fixed seeded choice of ``n`` prompts (without repeats while the file has enough)."""
    rng = random.Random(seed)
    if n <= len(prompts):
        return rng.sample(prompts, n)
    return [prompts[i] for i in (list(range(len(prompts))) * (n // len(prompts) + 1))[:n]]


@torch.no_grad()
def encode_prompts(model: Any, prompts: list[str]) -> torch.Tensor:
    """CLIP text encoder states (n, L, D) of ``prompts``, padded to the tokenizer's length as SD does."""
    tok = getattr(model, "tokenizer", None)
    enc = getattr(model, "text_encoder", None)
    if tok is None or enc is None:
        raise UserError(f"model '{model.name}' has no text encoder and tokenizer. Fix: use a text-conditional "
                        "model (e.g. model=sd14 with model.tokenizer=PATH) or dataset.conditioning=none/class.")
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return enc(ids.to(next(enc.parameters()).device)).last_hidden_state.float().cpu()


@torch.no_grad()
def conditioning_for(cfg: DictConfig, model: Any, n: int, seed: int,
                     classes: Any = None) -> tuple[Conditioning | None, dict[str, Any]]:
    """The contexts of samples 0..n-1 and what they are (labels or prompts), or (None, {}) unconditionally.

    ``classes`` replaces ``dataset.classes`` (the calibration record's own classes, ``calib.classes``)."""
    kind = str(cfg.dataset.get("conditioning", "none"))
    scale = float(cfg.sampler.get("guidance", 1.0))
    if kind == "none":
        if is_conditional(model):
            raise UserError(f"model '{model.name}' is conditional but dataset.conditioning=none. Fix: set "
                            "dataset.conditioning=class (with dataset.classes) or text (with dataset.prompts).")
        if scale != 1.0:
            raise UserError(f"sampler.guidance={scale} needs a conditional model; '{model.name}' is "
                            "unconditional. Fix: set sampler.guidance=1.")
        return None, {}
    if not is_conditional(model):
        raise UserError(f"dataset.conditioning={kind} but model '{model.name}' is unconditional. Fix: set "
                        "dataset.conditioning=none or pick a conditional model.")
    if kind == "class":
        emb = getattr(model, "class_embedder", None)
        if emb is None:
            raise UserError(f"model '{model.name}' has no class embedder. Fix: use dataset.conditioning=text.")
        field = "calib.classes" if classes else "dataset.classes"
        classes = list(classes or cfg.dataset.get("classes") or range(int(emb.n_classes)))
        bad = [c for c in classes if not 0 <= int(c) < int(emb.n_classes)]
        if bad:
            raise UserError(f"class id {bad[0]} is out of range: model '{model.name}' knows classes "
                            f"0..{int(emb.n_classes) - 1}. Fix: set {field} to ids in that range.")
        labels = [int(classes[i % len(classes)]) for i in range(n)]
        context = emb(torch.tensor(labels)).float().cpu()
        null = emb(torch.tensor([int(emb.null_class)])).float().cpu()
        return Conditioning(context, null, scale), {"labels": labels}
    prompts = choose_prompts(read_prompts(cfg.dataset.get("prompts")), n, seed)
    return Conditioning(encode_prompts(model, prompts), encode_prompts(model, [""]), scale), {"prompts": prompts}


def conditioning_key(info: dict[str, Any], cond: Conditioning | None) -> str | None:
    """What identifies the calibration contexts, for the record's cache key."""
    if cond is None:
        return None
    h = hashlib.sha256(json.dumps(info, sort_keys=True).encode())
    h.update(cond.context.numpy().tobytes())
    return f"{h.hexdigest()[:16]}@{cond.scale}"


@torch.no_grad()
def to_images(model: Any, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Model-space samples to images in [-1, 1]: latents decoded by the FP first stage, pixels as they are."""
    vae = getattr(model, "vae", None)
    if vae is None:
        return x
    scale = float(getattr(model, "scaling_factor", 1.0))
    dev = next(vae.parameters()).device
    outs = [vae.decode(x[i : i + batch_size].to(dev) / scale).sample.float().clamp(-1, 1).cpu()
            for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs)

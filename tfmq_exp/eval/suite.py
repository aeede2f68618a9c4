"""``evaluate``: one call from the app that turns generated images into a flat, JSON-ready metric dict."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tfmq_exp.errors import UserError
from tfmq_exp.eval.eval_config import EvalConfig, default_cache_root, eval_config
from tfmq_exp.eval.images import to_uint8_nchw
from tfmq_exp.eval.inception_metrics import inception_metrics
from tfmq_exp.eval.reference_stats import reference_stats
from tfmq_exp.eval.samples_io import save_adm_npz, save_png_folder
from tfmq_exp.eval.similarity import similarity_metrics

INCEPTION_METRICS = ("fid", "sfid", "kid", "is", "prc")
NO_LOGITS_BACKEND = "unavailable: backend clean_fid gives no logits (use evaluator.backend=torch_fidelity)"


def build_extractor(cfg: EvalConfig, cache_dir: str | Path | None = None):
    """The feature extractor ``cfg.backend`` names, with weights resolved as documented."""
    device = _device(cfg.device)
    if cfg.backend == "clean_fid":
        from tfmq_exp.eval.clean_fid_backend import CleanFidExtractor

        return CleanFidExtractor(cfg.clean_fid_mode, device=device, batch_size=cfg.batch_size)
    from tfmq_exp.eval.inception_network import InceptionExtractor
    from tfmq_exp.eval.inception_weights import resolve_inception_weights

    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    weights = resolve_inception_weights(cfg.inception_weights, root / "inception", cfg.allow_download)
    return InceptionExtractor(weights, device=device, batch_size=cfg.batch_size)


def evaluate(
    images: torch.Tensor | np.ndarray,
    cfg=None,
    *,
    reference=None,
    fp_images: torch.Tensor | np.ndarray | None = None,
    captions: list[str] | None = None,
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    extractor=None,
) -> dict[str, float | int | str]:
    """Metrics of generated uint8 images (N, C, H, W) as a flat JSON-serialisable dict.

    ``cfg``: evaluator options (dict, DictConfig, object or EvalConfig). ``reference``: the model's
    dataset ("mnist", a folder, an ADM .npz or a uint8 array), used when ``cfg.reference`` is null.
    ``fp_images``: the FP model's samples from the same noise, for MSE/PSNR/SSIM when
    ``cfg.diagnostics``. ``captions``: one per image, for CLIP score. ``cache_dir``: reference
    statistics and converted weights (default $TFMQ_CACHE or ~/.cache/tfmq_exp). ``out_dir``: where
    ``save_png``/``save_npz`` write samples. ``extractor``: reuse one across calls.
    """
    cfg = eval_config(cfg)
    images = to_uint8_nchw(images)
    if cfg.n_samples is not None:
        images = images[: cfg.n_samples]
    result: dict[str, float | int | str] = {"evaluator": cfg.name, "n_samples": len(images)}
    if out_dir is not None:
        _save_samples(images, cfg, Path(out_dir))

    wanted = [m for m in cfg.metrics if m in INCEPTION_METRICS]
    if wanted:
        spec = cfg.reference if cfg.reference is not None else reference
        if spec is None:
            raise UserError(
                "no reference set for FID. Fix: set evaluator.reference (folder, .npz or 'mnist')."
            )
        root = Path(cache_dir) if cache_dir is not None else default_cache_root()
        extractor = extractor or build_extractor(cfg, root)
        ref = reference_stats(
            spec, extractor, root, n=cfg.reference_n, need_pool="kid" in wanted or "prc" in wanted
        )
        gen = extractor.extract(images, desc="sample features")
        result.update(
            inception_metrics(
                gen,
                ref,
                wanted,
                kid_subset_size=cfg.kid_subset_size,
                kid_subsets=cfg.kid_subsets,
                isc_splits=cfg.isc_splits,
                rng_seed=cfg.rng_seed,
                frechet_method=cfg.frechet_method,
            )
        )
        if "is" in wanted and cfg.backend == "clean_fid":
            result["is"] = NO_LOGITS_BACKEND
        result.update(feature_source=extractor.source, reference=ref.description, n_reference=ref.n)

    if cfg.diagnostics and fp_images is not None:
        fp = to_uint8_nchw(fp_images) if _is_uint8(fp_images) else fp_images  # floats: NCHW in [0, 1]
        result.update(similarity_metrics(images, fp[: len(images)]))

    if "clip" in cfg.metrics:
        if captions is None:
            result["clip_score"] = "unavailable: no captions given (text-to-image models only)"
        else:
            from tfmq_exp.eval.clip_score import clip_score, load_clip

            model, image_processor, tokenizer = load_clip(cfg.clip_model, _device(cfg.device))
            result["clip_score"] = clip_score(
                images, list(captions)[: len(images)], model, image_processor, tokenizer, cfg.batch_size
            )
    return json_safe(result)


def json_safe(result: dict) -> dict[str, float | int | str]:
    """Plain Python scalars; non-finite floats become strings ("nan", "inf") so json.dumps stays strict."""
    safe = {}
    for key, value in result.items():
        if isinstance(value, (np.generic, torch.Tensor)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        safe[key] = value
    return safe


def _save_samples(images: torch.Tensor, cfg: EvalConfig, out_dir: Path) -> None:
    if cfg.save_png:
        save_png_folder(images, out_dir / "samples_png")
    if cfg.save_npz:
        n, _, h, w = images.shape  # ADM's file name: samples_NxHxWx3.npz
        save_adm_npz(images, out_dir / f"samples_{n}x{h}x{w}x3.npz")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _is_uint8(x) -> bool:
    return x.dtype == torch.uint8 if isinstance(x, torch.Tensor) else np.asarray(x).dtype == np.uint8

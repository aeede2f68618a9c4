"""FID, sFID, KID, IS and precision/recall from features already extracted.

FID/sFID use our Fréchet distance (so cached and ADM statistics work); KID, IS and precision/recall
call torch-fidelity's feature-level functions, so the numbers equal ``calculate_metrics``.
A metric that cannot be computed is reported as a string starting with "unavailable:".
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from tfmq_exp.eval.frechet import frechet_distance, gaussian_stats
from tfmq_exp.eval.inception_network import InceptionFeatures
from tfmq_exp.eval.reference_stats import ReferenceStats

IS_UNAVAILABLE = "unavailable: needs the full Inception weights (evaluator.inception_weights=...)"
SFID_UNAVAILABLE = (
    "unavailable: needs sFID features on both sides (backend torch_fidelity; ADM npz with mu_s)"
)
REF_FEATURES_UNAVAILABLE = "unavailable: the reference has statistics only (an ADM npz without images)"
KNOWN_METRICS = ("fid", "sfid", "kid", "is", "prc")


def inception_metrics(
    gen: InceptionFeatures,
    ref: ReferenceStats,
    metrics: list[str],
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    rng_seed: int = 2020,
    frechet_method: str = "sqrtm",
) -> dict[str, float | str]:
    """Flat dict of the requested metrics (names in ``KNOWN_METRICS``) for generated vs reference."""
    out: dict[str, float | str] = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(*gaussian_stats(gen.pool), ref.mu, ref.sigma, method=frechet_method)
    if "sfid" in metrics:
        if gen.spatial is None or ref.mu_s is None:
            out["sfid"] = SFID_UNAVAILABLE
        else:
            out["sfid"] = frechet_distance(
                *gaussian_stats(gen.spatial), ref.mu_s, ref.sigma_s, method=frechet_method
            )
    if "kid" in metrics:
        out.update(kid(gen.pool, ref.pool, kid_subset_size, kid_subsets, rng_seed))
    if "is" in metrics:
        out.update(inception_score(gen.logits, isc_splits, rng_seed))
    if "prc" in metrics:
        out.update(precision_recall(gen.pool, ref.pool))
    return out


def kid(
    gen_pool: np.ndarray, ref_pool: np.ndarray | None, subset_size: int, subsets: int, rng_seed: int
) -> dict:
    """torch-fidelity's KID (cubic polynomial kernel); subset size is capped at the smaller set's size."""
    if ref_pool is None:
        return {"kid_mean": REF_FEATURES_UNAVAILABLE}
    size = int(min(subset_size, len(gen_pool), len(ref_pool)))
    res = kid_features_to_metric(
        _f32(gen_pool),
        _f32(ref_pool),
        kid_subset_size=size,
        kid_subsets=subsets,
        rng_seed=rng_seed,
        verbose=False,
    )
    return {
        "kid_mean": res["kernel_inception_distance_mean"],
        "kid_std": res["kernel_inception_distance_std"],
        "kid_subset_size": size,
    }


def inception_score(logits: np.ndarray | None, splits: int = 10, rng_seed: int = 2020) -> dict:
    """torch-fidelity's IS on the unbiased logits: exp(E_x KL(p(y|x) || p(y))), mean/std over splits."""
    if logits is None:
        return {"is": IS_UNAVAILABLE}
    res = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=rng_seed)
    return {"is": res["inception_score_mean"], "is_std": res["inception_score_std"]}


def precision_recall(gen_pool: np.ndarray, ref_pool: np.ndarray | None, neighborhood: int = 3) -> dict:
    """Kynkäänniemi et al. improved precision/recall (k=3) via torch-fidelity."""
    if ref_pool is None:
        return {"precision": REF_FEATURES_UNAVAILABLE}
    res = prc_features_to_metric(
        _f32(gen_pool),
        _f32(ref_pool),
        prc_neighborhood=neighborhood,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    return {
        "precision": float(res["precision"]),
        "recall": float(res["recall"]),
        "f_score": float(res["f_score"]),
    }


def _f32(features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))

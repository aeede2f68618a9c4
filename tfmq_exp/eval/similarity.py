"""Similarity of quantized-model samples to FP-model samples from the same noise: MSE, PSNR, SSIM.

Convention: images are uint8 (0..255) or float in [0, 1], both mapped to float64 in [0, 1], so the
data range L is 1. MSE is the mean over all pixels; PSNR = 10 log10(1 / MSE) per image (MSE floored
at 1e-10, i.e. at most 100 dB, so identical images stay JSON-friendly), averaged over images.
SSIM is Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, population
(co)variances, statistics only where the window fits (as skimage's ``gaussian_weights=True``),
averaged per channel, then over the image and the batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MSE_FLOOR = 1e-10


def to_unit_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 -> /255; floats are taken to be in [0, 1] already. Returns float64 (N, C, H, W)."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    x = x.detach().cpu()
    x = x.double() / 255.0 if x.dtype == torch.uint8 else x.double()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got {tuple(x.shape)}")
    return x


def mse(a, b) -> float:
    """Mean squared error over all pixels, images in [0, 1]."""
    x, y = _pair(a, b)
    return float(((x - y) ** 2).mean())


def psnr(a, b) -> float:
    """Mean over images of 10 log10(1 / MSE_i), in dB, data range 1."""
    x, y = _pair(a, b)
    per_image = ((x - y) ** 2).flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return float((10.0 * torch.log10(1.0 / per_image)).mean())


def ssim(a, b, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM over the batch (see the module docstring for the exact convention)."""
    return float(ssim_per_image(a, b, window, sigma, k1, k2).mean())


def ssim_per_image(
    a, b, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """SSIM of each image pair, shape (N,)."""
    x, y = _pair(a, b)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images {tuple(x.shape[-2:])} are smaller than the {window}x{window} SSIM window")
    channels = x.shape[1]
    kernel = _gaussian_window(window, sigma).expand(channels, 1, window, window)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def similarity_metrics(images, fp_images) -> dict[str, float]:
    """{"mse", "psnr", "ssim"} of ``images`` against the FP model's ``fp_images`` (same noise, same order)."""
    return {"mse": mse(images, fp_images), "psnr": psnr(images, fp_images), "ssim": ssim(images, fp_images)}


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    from tfmq_exp.checks import require_finite

    x, y = to_unit_float(a), to_unit_float(b)
    fix = "the sampler produced NaN/Inf images; find where with traceback=true"
    require_finite(x, "images scored for similarity", fix)  # NaN == NaN would score a perfect match
    require_finite(y, "FP reference images for similarity", fix)
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)

"""Quantization math as pure functions (docs/methods.md §1.1-1.3).

Conventions: asymmetric integer grid [0, 2^b - 1]; ``scale`` and ``zero_point`` broadcast
against ``x`` (per output channel for weights, scalars for activations).
"""

from __future__ import annotations

import torch

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch (§1.3)
MIN_SCALE = 1e-8


def qrange(n_bits: int, symmetric: bool = False) -> tuple[int, int]:
    """Integer grid limits: [0, 2^b-1], or [-2^(b-1), 2^(b-1)-1] when symmetric."""
    if symmetric:
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is taken as 1 (straight-through estimator)."""
    return (x.round() - x).detach() + x


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Q(x) = s * (clip(round(x/s) + z, qmin, qmax) - z), with STE rounding.

    Gradients flow to ``x`` (STE) and to ``scale`` (the LSQ gradient, without its 1/sqrt(N Qp) factor).
    Where no gradient is recorded (calibration forwards, sampling) the same value takes half the passes:
    round_ste's (round(t) - t) + t is exactly round(t) (round(t) - t is exact by Sterbenz' lemma, or
    round(t) = 0), and on integer-valued floats clamp(r + z, qmin, qmax) - z is exactly clamp(r, qmin - z,
    qmax - z), so both paths give the same bits (tests/unit/test_functional.py).
    """
    needs_grad = x.requires_grad or scale.requires_grad or getattr(zero_point, "requires_grad", False)
    if not (torch.is_grad_enabled() and needs_grad):
        return torch.div(x, scale).round_().clamp_(qmin - zero_point, qmax - zero_point).mul_(scale)
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def minmax_params(
    x_min: torch.Tensor, x_max: torch.Tensor, n_bits: int, always_zero: bool = False, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from a range with 0 forced inside it (§1.2a)."""
    lo = torch.clamp(x_min, max=0.0)
    hi = torch.clamp(x_max, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / (2 ** (n_bits - 1) - 1), min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    if always_zero:
        scale = torch.clamp(hi / (2**n_bits - 1), min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (2**n_bits - 1), min=MIN_SCALE)
    return scale, torch.round(-lo / scale)


def qdiff_max_params(
    x_min: torch.Tensor, x_max: torch.Tensor, n_bits: int, always_zero: bool = False, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Diffusion's 'max' init (§1.2a): the scale spans the raw max - min, the zero point uses min(x_min, 0).

    Symmetric: scale = max(|min(x_min, 0)|, max(x_max, 0)) / (2^(b-1) - 1), z = 0. always_zero: as min-max.
    """
    if symmetric or always_zero:
        return minmax_params(x_min, x_max, n_bits, always_zero, symmetric)
    scale = torch.clamp((x_max - x_min) / (2**n_bits - 1), min=MIN_SCALE)
    return scale, torch.round(-torch.clamp(x_min, max=0.0) / scale)


def raw_range_params(
    x_min: torch.Tensor, x_max: torch.Tensor, n_bits: int, always_zero: bool = False, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from running extremes without forcing 0 into the range (QD's EMA update, §1.2c).

    Asymmetric: scale = (max - min) / (2^b - 1), z = round(-min / scale) (z may leave [0, 2^b - 1] for
    one-signed data; the grid still spans [min, max]). Symmetric: scale = max(|min|, |max|) / (2^(b-1) - 1).
    """
    if symmetric:
        scale = torch.clamp(torch.maximum(x_min.abs(), x_max.abs()) / (2 ** (n_bits - 1) - 1), min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    if always_zero:
        scale = torch.clamp(torch.clamp(x_max, min=0.0) / (2**n_bits - 1), min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((x_max - x_min) / (2**n_bits - 1), min=MIN_SCALE)
    return scale, torch.round(-x_min / scale)


def lp_search_params(
    x: torch.Tensor,
    n_bits: int,
    p: float = 2.4,
    n_candidates: int = 80,
    per_channel: bool = False,
    always_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lp clipping search ("mse" in the official code, §1.2b).

    Candidates shrink the raw extremes by 1.00, 0.99, ..., 0.21 (0 is not forced into the
    range); the first candidate with the smallest mean |Q(x) - x|^p wins. Per channel the
    search runs independently on every slice along dim 0. Returns tensors shaped like the
    slices' reduction (``(C,)`` per channel, ``()`` per tensor).
    """
    x = x.detach()
    flat = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    qmin, qmax = qrange(n_bits)
    # several candidates at once, in chunks that keep (chunk, rows, N) around 1M elements (small
    # tensors: no 80 rounds of Python overhead; large ones: one candidate at a time, in place, which
    # halves the time of this search on a CPU). Every operation is fake_quant's, in its order, so the
    # errors are bit-identical to fake_quant(x) - x.
    ratios = torch.tensor([1.0 - 0.01 * i for i in range(n_candidates)], dtype=flat.dtype, device=flat.device)
    chunk = max(1, (1 << 20) // max(1, flat.numel()))
    scales, zps, errs = [], [], []
    buf = None  # one error buffer for every chunk: a fresh tensor per candidate cost a quarter of the search
    for r in ratios.split(chunk):
        m, mx = lo[None, :] * r[:, None], hi[None, :] * r[:, None]
        if always_zero:
            scale = torch.clamp(mx / (2**n_bits - 1), min=MIN_SCALE)
            zp = torch.zeros_like(scale)
        else:
            scale = torch.clamp((mx - m) / (2**n_bits - 1), min=MIN_SCALE)
            zp = torch.round(-m / scale)
        s3, z3 = scale[..., None], zp[..., None]
        # fake_quant's value in fewer passes, bit for bit: round_ste's (round(t) - t) + t is exactly round(t)
        # (r - t is exact by Sterbenz' lemma, or r = 0), and on integer-valued floats clamp(r + z, lo, hi) - z
        # is exactly clamp(r, lo - z, hi - z)
        if buf is None or buf.shape[0] != len(r):
            buf = torch.empty((len(r), *flat.shape), dtype=flat.dtype, device=flat.device)
        err = torch.div(flat[None], s3, out=buf).round_()
        err.clamp_(qmin - z3, qmax - z3).mul_(s3).sub_(flat[None]).abs_().pow_(p)
        errs.append(err.mean(dim=-1))
        scales.append(scale)
        zps.append(zp)
    best = torch.cat(errs).argmin(dim=0)  # the first candidate with the smallest error
    rows = torch.arange(flat.shape[0], device=flat.device)
    best_scale, best_zp = torch.cat(scales)[best, rows], torch.cat(zps)[best, rows]
    if per_channel:
        return best_scale, best_zp
    return best_scale[0], best_zp[0]


def ema(old: torch.Tensor, new: torch.Tensor, momentum: float = 0.95) -> torch.Tensor:
    """Running statistic update m <- momentum * m + (1 - momentum) * new (§1.2c)."""
    return momentum * old + (1.0 - momentum) * new


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """AdaRound's h(alpha) = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_init_alpha(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """alpha such that h(alpha) equals the fractional part of w / scale (soft mode reproduces RTN-free W)."""
    r = w / scale - torch.floor(w / scale)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1.0)


def adaround_weight(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, alpha: torch.Tensor, n_bits: int, hard: bool
) -> torch.Tensor:
    """W~ = s * (clip(floor(W/s) + h + z, 0, 2^b-1) - z); h = h(alpha), or 1[alpha >= 0] when hard."""
    h = (alpha >= 0).to(w.dtype) if hard else rectified_sigmoid(alpha)
    qmin, qmax = qrange(n_bits)
    q = torch.clamp(torch.floor(w / scale) + h + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def adaround_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """f_reg = sum over elements of (1 - |2 h(alpha) - 1|^beta): a sum, not a mean (§9 T7)."""
    return (1.0 - (2.0 * rectified_sigmoid(alpha) - 1.0).abs().pow(beta)).sum()


def adaround_schedule(
    k: int, total: int, warmup: float = 0.2, beta_start: float = 20.0, beta_end: float = 2.0
) -> tuple[bool, float]:
    """(regulariser on?, beta) at iteration k of ``total`` (1-based, §1.3).

    Off while k < warmup * total; then beta decays linearly from beta_start to beta_end.
    """
    start = warmup * total
    if k < start:
        return False, beta_start
    frac = max(0.0, 1.0 - (k - start) / max(1e-12, total - start))
    return True, beta_end + (beta_start - beta_end) * frac

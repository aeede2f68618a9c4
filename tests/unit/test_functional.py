"""Quantizer math against hand-computed values (docs/methods.md §1)."""

import math

import pytest
import torch

from tfmq_exp.quant import functional as F


def test_fake_quant_hand_values():
    x = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.26, 2.0])
    # scale 0.5, zero point 2, 2 bits: grid {0..3} -> values {-1, -0.5, 0, 0.5}
    q = F.fake_quant(x, torch.tensor(0.5), torch.tensor(2.0), 0, 3)
    assert q.tolist() == [-1.0, -0.5, 0.0, 0.0, 0.5, 0.5]


def _ste_reference(x, scale, zp, qmin, qmax):
    """fake_quant's formula as written, with the straight-through rounding."""
    return (torch.clamp(F.round_ste(x / scale) + zp, qmin, qmax) - zp) * scale


@pytest.mark.parametrize("bits,per_channel", [(8, False), (4, True), (2, False)])
def test_fake_quant_without_gradients_gives_the_same_bits_as_the_ste_path(bits, per_channel):
    """The no-gradient path (fewer passes) against the STE formula: exact ties (k + 0.5) * s, values far
    outside the grid, exact grid points, one-signed zero points outside [0, 2^b - 1], per channel and not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 40, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 30.0, 1e4, 3.0]).view(-1, 1, 1)
    shape = (6, 1, 1) if per_channel else ()
    scale = (torch.rand(shape, generator=g) * 0.2 + 0.01) if per_channel else torch.tensor(0.037)
    zp = torch.round(torch.randn(shape, generator=g) * 3) if per_channel else torch.tensor(-7.0)
    x[0, 0, :10] = (torch.arange(10) - 4.5) * (scale[0, 0, 0] if per_channel else scale)  # ties
    x[1, 0, :10] = (torch.arange(10) - 5.0) * (scale[1, 0, 0] if per_channel else scale)  # grid points
    qmin, qmax = F.qrange(bits)
    got = F.fake_quant(x, scale, zp, qmin, qmax)
    ref = _ste_reference(x, scale, zp, qmin, qmax)
    assert torch.equal(got, ref)
    assert got.unique().numel() > 2  # not all clipped to one value
    with torch.no_grad():  # x that requires grad, under no_grad: the fast path as well
        assert torch.equal(F.fake_quant(x.clone().requires_grad_(True), scale, zp, qmin, qmax), ref)


def test_round_ste_gradient_is_one():
    x = torch.tensor([0.3, 1.7, -2.2], requires_grad=True)
    F.round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_fake_quant_scale_gets_lsq_gradient():
    s = torch.tensor(0.5, requires_grad=True)
    x = torch.tensor([0.3])  # round(0.6)=1 -> q = 0.5; dq/ds = round(x/s) - x/s = 1 - 0.6
    F.fake_quant(x, s, torch.tensor(0.0), 0, 255).sum().backward()
    assert s.grad.item() == pytest.approx(0.4)


def test_minmax_forces_zero_into_range():
    s, z = F.minmax_params(torch.tensor(0.5), torch.tensor(2.0), 8)
    assert s.item() == pytest.approx(2.0 / 255)
    assert z.item() == 0.0
    s, z = F.minmax_params(torch.tensor(-1.0), torch.tensor(3.0), 4)
    assert s.item() == pytest.approx(4.0 / 15)
    assert z.item() == round(1.0 / (4.0 / 15))  # round(3.75) = 4


def test_minmax_always_zero():
    s, z = F.minmax_params(torch.tensor(-1.0), torch.tensor(3.0), 8, always_zero=True)
    assert s.item() == pytest.approx(3.0 / 255) and z.item() == 0


def test_lp_search_picks_best_of_80_candidates():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2000), torch.tensor([12.0, -9.0])])  # outliers make clipping pay off
    s, z = F.lp_search_params(x, 4, p=2.4)
    errs = []
    for i in range(80):
        m, mx = x.min() * (1 - 0.01 * i), x.max() * (1 - 0.01 * i)
        sc = (mx - m) / 15
        zp = torch.round(-m / sc)
        errs.append(((F.fake_quant(x, sc, zp, 0, 15) - x).abs() ** 2.4).mean().item())
    best = min(range(80), key=lambda i: (errs[i], i))
    assert best > 0  # the search clipped
    expect = (x.max() - x.min()) * (1 - 0.01 * best) / 15
    assert s.item() == pytest.approx(expect.item(), rel=1e-6)


@pytest.mark.parametrize("numel", [3000, 20_000, 600_000])  # candidates per chunk: all 80 / 52 and 28 / one
def test_lp_search_choice_is_exactly_the_fake_quant_loop(numel):
    torch.manual_seed(2)
    x = torch.randn(numel) ** 3
    s, z = F.lp_search_params(x, 8, p=2.4)
    lo, hi = x.min(), x.max()
    errs, params = [], []
    for i in range(80):
        r = torch.tensor(1.0 - 0.01 * i)
        m, mx = lo * r, hi * r
        sc = torch.clamp((mx - m) / 255, min=F.MIN_SCALE)
        zp = torch.round(-m / sc)
        errs.append((F.fake_quant(x, sc, zp, 0, 255) - x).abs().pow(2.4).mean())
        params.append((sc, zp))
    best = int(torch.stack(errs).argmin())
    assert torch.equal(s, params[best][0]) and torch.equal(z, params[best][1])


def test_lp_search_per_channel_is_independent():
    torch.manual_seed(1)
    w = torch.randn(3, 4, 3, 3) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1, 1)
    s, z = F.lp_search_params(w, 4, per_channel=True)
    for c in range(3):
        sc, zc = F.lp_search_params(w[c], 4)
        assert s[c].item() == pytest.approx(sc.item()) and z[c].item() == zc.item()


def test_ema_update():
    assert F.ema(torch.tensor(1.0), torch.tensor(3.0), 0.95).item() == pytest.approx(0.95 + 0.15)


def test_adaround_soft_reproduces_weights_at_init():
    torch.manual_seed(0)
    w = torch.randn(8, 5)
    s = (w.abs().amax(1, keepdim=True) * 2.2) / 15  # grid [-8s, 7s] covers every w
    z = torch.full_like(s, 8.0)
    alpha = F.adaround_init_alpha(w, s)
    soft = F.adaround_weight(w, s, z, alpha, 4, hard=False)
    assert torch.allclose(soft, w, atol=1e-5)  # h(alpha) = frac(w/s), and w stays inside the grid


def test_adaround_hard_rounds_by_sign_of_alpha():
    w, s, z = torch.tensor([0.26, 0.74]), torch.tensor(0.5), torch.tensor(0.0)
    hard = F.adaround_weight(w, s, z, torch.tensor([1.0, -1.0]), 8, hard=True)
    assert hard.tolist() == [0.5, 0.5]  # floor(0.52)+1 = 1 -> 0.5; floor(1.48)+0 = 1 -> 0.5


def test_regularizer_is_a_sum():
    alpha = torch.zeros(10)  # h = 0.5 -> each term 1 - 0^beta = 1
    assert F.adaround_regularizer(alpha, 2.0).item() == pytest.approx(10.0)


def test_rectified_sigmoid_bounds():
    assert F.rectified_sigmoid(torch.tensor([-100.0, 100.0])).tolist() == [0.0, 1.0]
    assert F.rectified_sigmoid(torch.tensor(0.0)).item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("k", "on", "beta"),
    [(1, False, 20.0), (3999, False, 20.0), (4000, True, 20.0), (12000, True, 11.0), (20000, True, 2.0)],
)
def test_adaround_schedule(k, on, beta):
    got_on, got_beta = F.adaround_schedule(k, 20000)
    assert got_on is on
    assert got_beta == pytest.approx(beta)


def test_qrange():
    assert F.qrange(8) == (0, 255)
    assert F.qrange(8, symmetric=True) == (-128, 127)
    assert math.isclose(F.MIN_SCALE, 1e-8)

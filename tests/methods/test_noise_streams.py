"""Calibration noise never coincides with evaluation noise (issue: paper presets used seed 1234 for both)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tfmq_exp.diffusion.calib_data import collect, collect_official
from tfmq_exp.diffusion.sampling import Sampler
from tfmq_exp.diffusion.seeds import MAX_SEED, generators, sample_seed, stream_words

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def eps_model(x, t):
    return 0.1 * x


def test_same_seed_gives_different_calibration_and_evaluation_noise():
    s = Sampler(SCHED, steps=5, eta=1.0)
    rec = collect(eps_model, s, 6, (1, 4, 4), seed=1234, batch_size=4)
    eval_noise = torch.stack([torch.randn((1, 4, 4), generator=g) for g in generators(1234, range(6))])
    # the record's first step is each calibration trajectory's x_T: none equals any evaluation x_T
    assert not any(torch.equal(rec.xs[0, i], eval_noise[j]) for i in range(6) for j in range(6))
    # and calibration is reproducible from its own streams
    calib_noise = torch.stack([torch.randn((1, 4, 4), generator=g) for g in generators(1234, range(6), "calib")])
    assert torch.equal(rec.xs[0], calib_noise)


def test_evaluation_streams_are_unchanged():
    """Evaluation noise keeps the [seed, index] entropy, so earlier samples stay reproducible."""
    assert sample_seed(7, 3) == int(np.random.SeedSequence([7, 3]).generate_state(1, dtype=np.uint64)[0] >> 1)


@pytest.mark.parametrize(("a", "b"), [((1234, 0), (1234, 0)), ((0, 5), (5, 0)), ((MAX_SEED, 1), (1, MAX_SEED))])
def test_no_seed_pair_can_alias_across_purposes(a, b):
    """SeedSequence pads entropy with zero words; the calibration tag is a non-zero third word, so an
    evaluation stream [s, i, 0, 0] never equals a calibration stream [s', i', tag, ...]."""
    ev = stream_words(*a, purpose="sample")
    ca = stream_words(*b, purpose="calib")
    padded = [ev + [0] * (4 - len(ev)), ca + [0] * (4 - len(ca))]
    assert padded[0][2] == 0 and padded[1][2] != 0 and padded[0] != padded[1]
    assert sample_seed(*a, "sample") != sample_seed(*b, "calib")


def test_seeds_that_could_spill_into_the_next_word_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        stream_words(MAX_SEED + 1, 0)
    with pytest.raises(ValueError, match="out of range"):
        stream_words(-1, 0)


def test_official_mode_draws_fresh_noise_per_step():
    s = Sampler(SCHED, steps=4, eta=0.0)
    rec = collect_official(eps_model, s, 3, (1, 2, 2), seed=1, batch_size=2)
    one = collect(eps_model, s, 3, (1, 2, 2), seed=1, batch_size=2)
    assert rec.stats["mode"] == "official" and one.stats["mode"] == "one_pass"
    # step k of the official pool: fresh noise from step k's own streams, then exactly k DDIM updates
    for k in range(4):
        gens = generators(1, range(3), "calib", step=k)
        x = torch.stack([torch.randn((1, 2, 2), generator=g) for g in gens]).double().float()
        for i in range(k):
            x = s._ddim_step(x, eps_model(x, None), i, gens)
        assert torch.allclose(rec.xs[k], x, atol=1e-6), k
    assert not torch.equal(rec.xs[0], one.xs[0])  # the step-0 noise differs from the one-pass streams
    # model calls: k per trajectory for step k (0 + 1 + 2 + 3 = 6 per sample) vs S per trajectory
    assert rec.stats["model_calls"] == 3 * 6 and one.stats["model_calls"] == 3 * 4

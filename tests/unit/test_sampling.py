"""Samplers: time-step schedules, per-sample seeds, the one-pass calibration record."""

from __future__ import annotations

import pytest
import torch

from tfmq_exp.diffusion.calib_data import collect, load_or_collect
from tfmq_exp.diffusion.sampling import Sampler, ddim_timesteps, to_uint8
from tfmq_exp.diffusion.seeds import generators
from tfmq_exp.errors import UserError
from tfmq_exp.quant.steps import current_step

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def toy_eps(x, t):
    return 0.1 * x + t.view(-1, 1, 1, 1).float() / 1000


def test_uniform_and_quad_schedules():
    assert ddim_timesteps(1000, 5, "uniform") == [800, 600, 400, 200, 0]
    quad = ddim_timesteps(1000, 100, "quad")
    assert len(quad) == 100 and quad[:2] == [800, 783] and quad[-4:] == [0, 0, 0, 0]  # int() of squares, as DDIM
    diffs = [a - b for a, b in zip(quad, quad[1:])]
    assert diffs[0] > diffs[-1]  # quadratic: big strides at high noise, small near the data


def test_step_count_that_would_silently_change_is_an_error():
    with pytest.raises(UserError, match="would run 500 steps"):
        ddim_timesteps(1000, 400, "uniform")


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_samples_do_not_depend_on_batch_size(kind):
    s = Sampler(SCHED, kind=kind, steps=10 if kind == "ddim" else 1000, eta=1.0)
    if kind == "ddpm":
        s.timesteps = s.timesteps[-20:]  # the last 20 ancestral steps keep the test fast
    a = s.sample(toy_eps, 5, (1, 4, 4), seed=3, batch_size=5)
    b = s.sample(toy_eps, 5, (1, 4, 4), seed=3, batch_size=2)
    c = s.sample(toy_eps, 2, (1, 4, 4), seed=3, batch_size=2, start=3)  # a shard: samples 3 and 4
    assert torch.equal(a, b) and torch.equal(a[3:], c)
    assert not torch.equal(a, s.sample(toy_eps, 5, (1, 4, 4), seed=4, batch_size=5))


def test_sampler_sets_step_index_for_each_model_call():
    seen = []

    def eps(x, t):
        seen.append((current_step(), int(t[0])))
        return torch.zeros_like(x)

    s = Sampler(SCHED, steps=4, eta=0.0)
    s.sample(eps, 1, (1, 2, 2), seed=0)
    assert seen == [(0, 750), (1, 500), (2, 250), (3, 0)]


def test_calibration_record_and_cache(tmp_path):
    s = Sampler(SCHED, steps=5, eta=1.0)
    rec = collect(toy_eps, s, 6, (1, 4, 4), seed=1, batch_size=4)
    assert rec.xs.shape == (5, 6, 1, 4, 4) and rec.ts.tolist() == [800, 600, 400, 200, 0]
    # the first recorded step is each trajectory's initial noise, from the calibration streams
    noise = torch.stack([torch.randn((1, 4, 4), generator=g) for g in generators(1, range(6), "calib")])
    assert torch.equal(rec.xs[0], noise)
    assert rec.stats["model_calls"] == 6 * 5
    pool = rec.pool(step_every=2, per_step=3)
    assert pool.x.shape[0] == 9 and pool.step.tolist() == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert pool.t.tolist() == [800] * 3 + [400] * 3 + [0] * 3
    key = {"model": "toy", "n": 6}
    r1, hit1 = load_or_collect(tmp_path, key, toy_eps, s, 6, (1, 4, 4), 1, 4)
    r2, hit2 = load_or_collect(tmp_path, key, toy_eps, s, 6, (1, 4, 4), 1, 4)
    assert (hit1, hit2) == (False, True) and torch.equal(r1.xs, r2.xs) and torch.equal(r1.xs, rec.xs)
    _, hit3 = load_or_collect(tmp_path, {**key, "n": 7}, toy_eps, s, 6, (1, 4, 4), 1, 4)
    assert hit3 is False


def test_to_uint8():
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize(("n", "world"), [(10, 3), (4, 4), (3, 5), (64, 2)])
def test_shards_partition_the_indices(n, world):
    from tfmq_exp.diffusion.sharding import shard

    blocks = [shard(n, r, world) for r in range(world)]
    covered = [i for start, count in blocks for i in range(start, start + count)]
    assert covered == list(range(n))


def test_sharded_sampling_equals_one_device():
    """What each rank draws, concatenated in rank order, is what one process draws."""
    from tfmq_exp.diffusion.sharding import sample_sharded, shard

    s = Sampler(SCHED, steps=5, eta=1.0)
    whole = sample_sharded(s, toy_eps, 7, (1, 4, 4), seed=2, batch_size=3)
    blocks = [shard(7, r, 3) for r in range(3)]
    parts = [s.sample(toy_eps, c, (1, 4, 4), seed=2, batch_size=3, start=st) for st, c in blocks]
    assert torch.equal(whole, torch.cat(parts))

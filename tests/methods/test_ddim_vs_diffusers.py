"""The DDIM update against diffusers' DDIMScheduler.step, step by step, for eta 0 and 1, uniform and quad."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from tfmq_exp.diffusion.sampling import Sampler
from tfmq_exp.diffusion.seeds import generators, randn_per_sample

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def eps_model(x, t):
    return torch.tanh(0.7 * x) + 0.01 * t.view(-1, 1, 1, 1).float() / 1000


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(("skip", "steps"), [("uniform", 20), ("quad", 100)])
@pytest.mark.parametrize("clip", [False, True])
def test_each_step_equals_diffusers(eta, skip, steps, clip):
    ours = Sampler(SCHED, steps=steps, eta=eta, skip=skip, clip_x0=clip)
    ref = DDIMScheduler(**SCHED, clip_sample=clip, set_alpha_to_one=True)
    seq = ours.timesteps
    if skip == "quad":
        assert seq[-4:] == [0, 0, 0, 0]  # the DDIM code's int() of squares repeats small t
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(seq):
        t_prev = seq[i + 1] if i + 1 < len(seq) else -1
        stride = t - t_prev if t_prev >= 0 else 1
        # diffusers takes prev_timestep = t - T // num_inference_steps: pick the count that gives this stride
        ref.num_inference_steps = 1001 if stride == 0 else 1000 // stride
        assert (1000 // ref.num_inference_steps) == stride, (t, t_prev)
        tt = torch.full((3,), t)
        eps = eps_model(x, tt)
        gens = generators(5, range(3))
        noise = randn_per_sample((1, 4, 4), generators(5, range(3)))
        got = ours._ddim_step(x, eps, i, gens)
        want = ref.step(eps, t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (i, t, (got - want).abs().max())
        if t_prev == t:
            assert torch.allclose(got, x, atol=1e-6)  # a repeated step is the identity, as in the DDIM code
        x = got

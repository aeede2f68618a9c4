"""PLMS and guided DDIM against diffusers' schedulers; the guidance formula on a hand-built case."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, PNDMScheduler

from tfmq_exp.diffusion.sampling import Conditioning, Sampler, guided_eps
from tfmq_exp.diffusion.seeds import generators, randn_per_sample
from tfmq_exp.quant.steps import current_step

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
LDM = {"timestep_offset": 1, "final_alpha_one": False, "clip_x0": False}


def model_fn(x, t, ctx=None):
    base = torch.tanh(0.5 * x) + 0.02 * t.view(-1, 1, 1, 1).float() / 1000
    return base if ctx is None else base + ctx.mean((1, 2)).view(-1, 1, 1, 1)


def test_guidance_is_one_call_of_the_doubled_batch():
    calls = []

    def fn(x, t, ctx):
        calls.append((x.shape[0], ctx[:, 0, 0].tolist()))
        return ctx[:, :1, :1].view(-1, 1, 1, 1).expand_as(x).clone()

    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([5, 5])
    cond = Conditioning(context=torch.tensor([[[3.0]], [[5.0]]]), null=torch.tensor([[[1.0]]]), scale=2.5)
    eps = guided_eps(fn, x, t, cond.context, cond)
    assert calls == [(4, [1.0, 1.0, 3.0, 5.0])]  # [uc, uc, c0, c1]: one forward, unconditional half first
    assert torch.equal(eps[:, 0, 0, 0], torch.tensor([1 + 2.5 * (3 - 1), 1 + 2.5 * (5 - 1)]))


def test_plms_equals_diffusers_pndm_with_skipped_prk_steps():
    steps, seen = 10, []

    def fn(x, t, ctx=None):
        seen.append((current_step(), int(t[0])))
        return model_fn(x, t)

    ours = Sampler(SCHED, kind="plms", steps=steps, eta=0.0, **LDM)
    x_ours = ours.sample(fn, 3, (1, 4, 4), seed=0, batch_size=3)
    ref = PNDMScheduler(**SCHED, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(steps)
    x = randn_per_sample((1, 4, 4), generators(0, range(3)))
    ref_calls = []
    for t in ref.timesteps:
        tt = torch.full((3,), int(t))
        ref_calls.append(int(t))
        x = ref.step(model_fn(x, tt), t, x).prev_sample
    assert [t for _, t in seen] == ref_calls  # S + 1 calls: the first step's extra call at t_next
    assert [s for s, _ in seen] == [0, 1] + list(range(1, steps))  # the extra call uses t_next's table
    assert ours.timesteps[0] == 901 and ours.timesteps[-1] == 1  # the LDM code's +1 offset
    assert torch.allclose(x_ours, x, atol=1e-4, rtol=1e-4), (x_ours - x).abs().max()


def test_guided_ddim_equals_diffusers_with_the_guided_estimate():
    steps, scale = 8, 3.0
    ctx = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))
    null = torch.zeros(1, 2, 4)
    ours = Sampler(SCHED, kind="ddim", steps=steps, eta=0.0, **LDM)
    got = ours.sample(model_fn, 3, (1, 4, 4), seed=0, batch_size=2, cond=Conditioning(ctx, null, scale))
    ref = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(steps)
    assert [int(t) for t in ref.timesteps] == ours.timesteps
    x = randn_per_sample((1, 4, 4), generators(0, range(3)))
    for t in ref.timesteps:
        tt = torch.full((3,), int(t))
        e_c, e_uc = model_fn(x, tt, ctx), model_fn(x, tt, null.expand(3, 2, 4))
        x = ref.step(e_uc + scale * (e_c - e_uc), t, x, eta=0.0).prev_sample
    assert torch.allclose(got, x, atol=1e-4, rtol=1e-4), (got - x).abs().max()
    plain = ours.sample(model_fn, 3, (1, 4, 4), seed=0, batch_size=2, cond=Conditioning(ctx, null, 1.0))
    assert not torch.allclose(plain, got, atol=1e-3)  # the scale matters

"""DDIM (eta, step count, uniform or quadratic skipping), PLMS and DDPM sampling, with classifier-free guidance.

DDIM follows Song et al.'s generalized update over the model's training schedule
(``alphas_cumprod`` from diffusers' DDPMScheduler); time-step sequences follow the DDIM
code (docs/methods.md §10): uniform = range(0, T, T // S), quad = (linspace(0, sqrt(0.8 T), S))^2.
The LDM/SD code shifts the uniform sequence by +1 and ends on alphas_cumprod[0] instead of 1
(``timestep_offset=1``, ``final_alpha_one=False``). PLMS is the LDM code's sampler (diffusers: PNDM with
``skip_prk_steps``): a pseudo improved-Euler first step, whose extra model call at t_next runs under
that step's index, then Adams-Bashforth multistep. DDPM is the ancestral sampler over all T steps
(posterior variance beta~). Every model call happens inside ``step_context(i)`` so per-step activation
tables (FSC) see the step index ``i`` (0 = noisiest).

Conditional models get a ``Conditioning``: each sample's context (class or prompt encoder states) and the
null context; with a guidance scale s != 1 each call runs the doubled batch [uc, c] once and uses
eps_uc + s (eps_c - eps_uc), as the LDM code does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from tfmq_exp.diffusion.seeds import generators, randn_per_sample
from tfmq_exp.errors import UserError
from tfmq_exp.progress import progress_bar as tqdm
from tfmq_exp.quant.steps import step_context

# model_fn(x_t, t (B,) long[, context (B, L, D)]) -> predicted noise
ModelFn = Callable[..., torch.Tensor]
# record(step_index, x_t, t) during sampling: calibration-data collection
RecordFn = Callable[[int, torch.Tensor, int], None]
KINDS = ("ddim", "plms", "ddpm")


@dataclass
class Conditioning:
    """Contexts for ``n`` samples (rows follow the global sample index) and the null context for guidance."""

    context: torch.Tensor  # (n, L, D)
    null: torch.Tensor | None = None  # (1, L, D)
    scale: float = 1.0  # classifier-free guidance scale; 1 = conditional only

    def __post_init__(self) -> None:
        if self.scale != 1.0 and self.null is None:
            raise ValueError("classifier-free guidance needs the null context")

    @property
    def guided(self) -> bool:
        return self.scale != 1.0

    def rows(self, indices: range | list[int]) -> torch.Tensor:
        return self.context[list(indices)]


def guided_eps(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor | None,
               cond: Conditioning | None) -> torch.Tensor:
    """The sampler's noise estimate: unconditional, conditional, or guided (one call of the doubled batch)."""
    if ctx is None:
        return model_fn(x, t).float()
    if cond is None or not cond.guided:
        return model_fn(x, t, ctx).float()
    null = cond.null.to(ctx.device, ctx.dtype).expand(x.shape[0], *cond.null.shape[1:])
    eps = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, ctx])).float()
    eps_uc, eps_c = eps.chunk(2)
    return eps_uc + cond.scale * (eps_c - eps_uc)


def ddim_timesteps(num_train: int, steps: int, skip: str, offset: int = 0, uniform_steps: str = "exact") -> list[int]:
    """Descending time steps of an S-step DDIM schedule (``offset``: the LDM code's +1).

    Uniform skipping takes every ``T // S``-th step. When S does not divide T that is more than S steps
    (400 of 1000: stride 2, 500 steps, the LDM code's LSUN-Churches run, docs/methods.md §9 T4):
    ``uniform_steps="exact"`` refuses, ``"stride"`` runs what the official code runs, and every per-step
    table then covers the steps actually run.
    """
    if steps < 1 or steps > num_train:
        raise UserError(f"sampler.steps={steps} is out of range. Fix: use 1..{num_train}.")
    if uniform_steps not in ("exact", "stride"):
        raise UserError(f"unknown sampler.uniform_steps '{uniform_steps}'. Fix: use 'exact' or 'stride'.")
    if skip == "uniform":
        stride = num_train // steps
        seq = list(range(0, num_train, stride))
        if len(seq) != steps and uniform_steps == "exact":
            raise UserError(
                f"uniform DDIM skipping needs sampler.steps to divide {num_train}: {steps} would run "
                f"{len(seq)} steps. Fix: pick a divisor (e.g. 50, 100, 200, 250, 500), sampler.skip=quad, or "
                f"sampler.uniform_steps=stride to run the {len(seq)} steps the official LDM code runs."
            )
    elif skip == "quad":
        # as the DDIM code: int() of the squares, so small t can repeat (e.g. 0, 0, 0, 0, 1, 2, 2, ...)
        seq = [int(v) for v in np.linspace(0, np.sqrt(num_train * 0.8), steps) ** 2]
    else:
        raise UserError(f"unknown sampler.skip '{skip}'. Fix: use 'uniform' or 'quad'.")
    return [t + offset for t in seq][::-1]


@dataclass
class Sampler:
    """A configured sampler over a model's training noise schedule."""

    scheduler_config: dict[str, Any]
    kind: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    skip: str = "uniform"
    clip_x0: bool = True
    device: str = "cpu"  # where the model runs; samples come back on the CPU
    timestep_offset: int = 0  # LDM/SD code: 1
    final_alpha_one: bool = True  # LDM/SD code: False (the last step ends on alphas_cumprod[0])
    guidance: float = 1.0  # classifier-free guidance scale the run's Conditioning uses (part of the schedule)
    uniform_steps: str = "exact"  # "stride": a non-divisor step count runs range(0, T, T // steps) as LDM's code

    def __post_init__(self) -> None:
        cfg = dict(self.scheduler_config)
        cfg["clip_sample"] = self.clip_x0
        self.ddpm = DDPMScheduler(**cfg)
        self.num_train = int(self.ddpm.config.num_train_timesteps)
        if self.kind in ("ddim", "plms"):
            if self.kind == "plms" and self.eta != 0:
                raise UserError(f"PLMS is deterministic: sampler.eta={self.eta}. Fix: set sampler.eta=0.")
            self.timesteps = ddim_timesteps(self.num_train, self.steps, self.skip, self.timestep_offset,
                                            self.uniform_steps)
        elif self.kind == "ddpm":
            self.steps = self.num_train
            self.timesteps = list(range(self.num_train))[::-1]
        else:
            raise UserError(f"unknown sampler '{self.kind}'. Fix: use sampler=ddim, plms or ddpm.")
        self.alphas_cumprod = self.ddpm.alphas_cumprod.double()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.num_steps, "eta": self.eta, "skip": self.skip, "clip_x0": self.clip_x0,
                "timestep_offset": self.timestep_offset, "final_alpha_one": self.final_alpha_one,
                "guidance": self.guidance}

    @torch.no_grad()
    def sample_batch(
        self, model_fn: ModelFn, shape: tuple[int, ...], seed: int, indices: range, record: RecordFn | None = None,
        purpose: str = "sample", stop_before: int | None = None, stream_step: int | None = None,
        cond: Conditioning | None = None,
    ) -> torch.Tensor:
        """Denoise the samples ``indices`` (global indices under ``seed``); returns x_0 in model space.

        ``purpose`` picks the noise stream (``seeds.PURPOSES``: evaluation and calibration never share
        noise). ``stop_before=k`` returns x at step k, before its model call (k model calls in all), the
        way TFMQ's official calibration generator stops; ``stream_step`` gives that run its own noise.
        ``cond`` holds the contexts of all samples (rows picked by ``indices``) and the guidance scale.
        """
        gens = generators(seed, indices, purpose, stream_step)
        x = randn_per_sample(shape, gens).to(self.device)  # noise drawn on the CPU: the same on any device
        n = x.shape[0]
        ctx = None if cond is None else cond.rows(indices).to(self.device)
        old_eps: list[torch.Tensor] = []
        for i, t in enumerate(self.timesteps):
            if record is not None:
                record(i, x, t)
            if stop_before is not None and i == stop_before:
                return x
            tt = torch.full((n,), t, dtype=torch.long, device=x.device)
            with step_context(i):
                eps = guided_eps(model_fn, x, tt, ctx, cond)
            if self.kind == "ddim":
                x = self._ddim_step(x, eps, i, gens)
            elif self.kind == "plms":
                x = self._plms_step(model_fn, x, eps, i, old_eps, ctx, cond)
            else:
                x = self._ddpm_step(x, eps, t, gens)
        return x

    def _alphas(self, i: int) -> tuple[float, float]:
        """alpha-bar at step i and at the step it moves to (1, or alphas_cumprod[0] in the LDM code, at the end)."""
        t = self.timesteps[i]
        a = self.alphas_cumprod[t].item()
        if i + 1 < self.num_steps:
            return a, self.alphas_cumprod[self.timesteps[i + 1]].item()
        return a, 1.0 if self.final_alpha_one else self.alphas_cumprod[0].item()

    def _ddim_step(self, x: torch.Tensor, eps: torch.Tensor, i: int, gens: list[torch.Generator]) -> torch.Tensor:
        a, a_prev = self._alphas(i)
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        out = a_prev**0.5 * x0 + max(0.0, 1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            out = out + sigma * randn_per_sample(tuple(x.shape[1:]), gens).to(x.device)
        return out

    def _plms_step(
        self, model_fn: ModelFn, x: torch.Tensor, eps: torch.Tensor, i: int, old_eps: list[torch.Tensor],
        ctx: torch.Tensor | None, cond: Conditioning | None,
    ) -> torch.Tensor:
        """One PLMS step from step i (deterministic DDIM update with a multistep noise estimate)."""
        if not old_eps:
            if i + 1 < self.num_steps:  # pseudo improved Euler: one extra call at t_next, under step i + 1
                x_next = self._ddim_step(x, eps, i, [])
                tt = torch.full((x.shape[0],), self.timesteps[i + 1], dtype=torch.long, device=x.device)
                with step_context(i + 1):
                    eps_next = guided_eps(model_fn, x_next, tt, ctx, cond)
                e = (eps + eps_next) / 2
            else:
                e = eps
        elif len(old_eps) == 1:
            e = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        old_eps.append(eps)
        if len(old_eps) > 3:
            old_eps.pop(0)
        return self._ddim_step(x, e, i, [])

    def _ddpm_step(self, x: torch.Tensor, eps: torch.Tensor, t: int, gens: list[torch.Generator]) -> torch.Tensor:
        """Ancestral step with the posterior variance beta~ (Ho et al.), noise from per-sample streams."""
        a = self.alphas_cumprod[t].item()
        a_prev = self.alphas_cumprod[t - 1].item() if t > 0 else 1.0
        beta = 1 - a / a_prev
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        mu = (a_prev**0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x
        if t == 0:
            return mu
        var = (1 - a_prev) / (1 - a) * beta
        return mu + var**0.5 * randn_per_sample(tuple(x.shape[1:]), gens).to(x.device)

    def sample(
        self,
        model_fn: ModelFn,
        n: int,
        image_shape: tuple[int, ...],
        seed: int,
        batch_size: int = 64,
        start: int = 0,
        record: RecordFn | None = None,
        desc: str = "sample",
        purpose: str = "sample",
        cond: Conditioning | None = None,
    ) -> torch.Tensor:
        """Samples ``start .. start + n - 1`` under ``seed``, in batches; returns x_0 (n, C, H, W).

        ``cond.context`` has one row per global sample index (at least ``start + n`` rows)."""
        outs = []
        bar = tqdm(total=n, desc=desc, unit="img", mininterval=2.0)
        for b0 in range(start, start + n, batch_size):
            idx = range(b0, min(b0 + batch_size, start + n))
            outs.append(self.sample_batch(model_fn, image_shape, seed, idx, record, purpose, cond=cond).cpu())
            bar.update(len(idx))
        bar.close()
        return torch.cat(outs)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def unet_fn(unet: torch.nn.Module) -> ModelFn:
    """Adapt a diffusers UNet to ``model_fn(x, t[, context]) -> eps`` (context as ``encoder_hidden_states``)."""

    def fn(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        if ctx is None:
            return unet(x, t).sample
        return unet(x, t, encoder_hidden_states=ctx).sample

    return fn

"""DDIM (eta, step count, uniform or quadratic skipping) and DDPM sampling.

DDIM follows Song et al.'s generalized update over the model's training schedule
(``alphas_cumprod`` from diffusers' DDPMScheduler); time-step sequences follow the DDIM
code (docs/methods.md §10): uniform = range(0, T, T // S), quad = (linspace(0, sqrt(0.8 T), S))^2.
DDPM is the ancestral sampler over all T steps (posterior variance beta~). Every model call happens inside
``step_context(i)`` so per-step activation tables (FSC) see the step index ``i`` (0 = noisiest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from tfmq_exp.diffusion.seeds import generators, randn_per_sample
from tfmq_exp.errors import UserError
from tfmq_exp.quant.steps import step_context

# model_fn(x_t, t (B,) long) -> predicted noise
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# record(step_index, x_t, t) during sampling: calibration-data collection
RecordFn = Callable[[int, torch.Tensor, int], None]


def ddim_timesteps(num_train: int, steps: int, skip: str) -> list[int]:
    """Descending time steps of an S-step DDIM schedule."""
    if steps < 1 or steps > num_train:
        raise UserError(f"sampler.steps={steps} is out of range. Fix: use 1..{num_train}.")
    if skip == "uniform":
        stride = num_train // steps
        seq = list(range(0, num_train, stride))
        if len(seq) != steps:  # e.g. 400 of 1000 would silently run 500 steps (docs/methods.md §9 T4)
            raise UserError(
                f"uniform DDIM skipping needs sampler.steps to divide {num_train}: {steps} would run "
                f"{len(seq)} steps. Fix: pick a divisor (e.g. 50, 100, 200, 250, 500) or sampler.skip=quad."
            )
    elif skip == "quad":
        # as the DDIM code: int() of the squares, so small t can repeat (e.g. 0, 0, 0, 0, 1, 2, 2, ...)
        seq = [int(v) for v in np.linspace(0, np.sqrt(num_train * 0.8), steps) ** 2]
    else:
        raise UserError(f"unknown sampler.skip '{skip}'. Fix: use 'uniform' or 'quad'.")
    return seq[::-1]


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

    def __post_init__(self) -> None:
        cfg = dict(self.scheduler_config)
        cfg["clip_sample"] = self.clip_x0
        self.ddpm = DDPMScheduler(**cfg)
        self.num_train = int(self.ddpm.config.num_train_timesteps)
        if self.kind == "ddim":
            self.timesteps = ddim_timesteps(self.num_train, self.steps, self.skip)
        elif self.kind == "ddpm":
            self.steps = self.num_train
            self.timesteps = list(range(self.num_train))[::-1]
        else:
            raise UserError(f"unknown sampler '{self.kind}'. Fix: use sampler=ddim or sampler=ddpm.")
        self.alphas_cumprod = self.ddpm.alphas_cumprod.double()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.num_steps, "eta": self.eta, "skip": self.skip, "clip_x0": self.clip_x0}

    @torch.no_grad()
    def sample_batch(
        self, model_fn: ModelFn, shape: tuple[int, ...], seed: int, indices: range, record: RecordFn | None = None,
        purpose: str = "sample", stop_before: int | None = None, stream_step: int | None = None,
    ) -> torch.Tensor:
        """Denoise the samples ``indices`` (global indices under ``seed``); returns x_0 in model space.

        ``purpose`` picks the noise stream (``seeds.PURPOSES``: evaluation and calibration never share
        noise). ``stop_before=k`` returns x at step k, before its model call (k model calls in all), the
        way TFMQ's official calibration generator stops; ``stream_step`` gives that run its own noise.
        """
        gens = generators(seed, indices, purpose, stream_step)
        x = randn_per_sample(shape, gens).to(self.device)  # noise drawn on the CPU: the same on any device
        n = x.shape[0]
        for i, t in enumerate(self.timesteps):
            if record is not None:
                record(i, x, t)
            if stop_before is not None and i == stop_before:
                return x
            tt = torch.full((n,), t, dtype=torch.long, device=x.device)
            with step_context(i):
                eps = model_fn(x, tt).float()
            x = self._ddim_step(x, eps, i, gens) if self.kind == "ddim" else self._ddpm_step(x, eps, t, gens)
        return x

    def _ddim_step(self, x: torch.Tensor, eps: torch.Tensor, i: int, gens: list[torch.Generator]) -> torch.Tensor:
        t = self.timesteps[i]
        t_prev = self.timesteps[i + 1] if i + 1 < self.num_steps else -1
        a = self.alphas_cumprod[t].item()
        a_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        out = a_prev**0.5 * x0 + max(0.0, 1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            out = out + sigma * randn_per_sample(tuple(x.shape[1:]), gens).to(x.device)
        return out

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
    ) -> torch.Tensor:
        """Samples ``start .. start + n - 1`` under ``seed``, in batches; returns x_0 (n, C, H, W)."""
        outs = []
        bar = tqdm(total=n, desc=desc, unit="img", mininterval=2.0)
        for b0 in range(start, start + n, batch_size):
            idx = range(b0, min(b0 + batch_size, start + n))
            outs.append(self.sample_batch(model_fn, image_shape, seed, idx, record, purpose).cpu())
            bar.update(len(idx))
        bar.close()
        return torch.cat(outs)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def unet_fn(unet: torch.nn.Module) -> ModelFn:
    """Adapt a diffusers UNet2DModel to ``model_fn(x, t) -> eps``."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t).sample

    return fn

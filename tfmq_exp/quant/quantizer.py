"""UniformQuantizer: one module for weight and activation fake-quantization.

States (flags, set by the recipe and the calibration loop):
* ``enabled``: off means identity.
* ``observing``: calibration; the first tensor seen initialises the range (Lp search or
  min-max), later ones update it with an EMA when ``running_stat`` is on, or widen it when
  ``init == "minmax"`` (global min-max over the pool).
* per-step tables (FSC): ``step_scale``/``step_zero_point`` of shape (S, ...) indexed by
  ``steps.current_step()``.
* ``rounding``: "nearest" (STE), or AdaRound "soft"/"hard" with a learned ``alpha``.
"""

from __future__ import annotations

import torch
from torch import nn

from tfmq_exp.quant import functional as F
from tfmq_exp.quant.steps import current_step

# lp: Lp clipping search; minmax: min-max with 0 inside (TFMQ); max: Q-Diffusion's 'max' (docs/methods.md §1.2)
INITS = ("lp", "minmax", "max")
# how a running statistic (EMA of batch extremes) becomes (scale, z): TFMQ forces 0 into the range, QD does not
EMA_RULES = ("zero_forced", "raw")


class StepNotCalibratedError(RuntimeError):
    """A sampling step outside the per-step activation tables."""


class UniformQuantizer(nn.Module):
    def __init__(
        self,
        n_bits: int = 8,
        per_channel: bool = False,
        init: str = "lp",
        p: float = 2.4,
        always_zero: bool = False,
        symmetric: bool = False,
        momentum: float = 0.95,
        enabled: bool = True,
        ema: str = "zero_forced",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown range init '{init}' (use one of {list(INITS)})")
        if ema not in EMA_RULES:
            raise ValueError(f"unknown running-stat range rule '{ema}' (use one of {list(EMA_RULES)})")
        self.n_bits, self.per_channel, self.init, self.ema = int(n_bits), per_channel, init, ema
        self.p, self.always_zero, self.symmetric, self.momentum = p, always_zero, symmetric, momentum
        self.enabled = enabled
        self.groups = 0  # > 0: FSC of that many steps in one forward (``_grouped_forward``)
        self.observing = False
        self.running_stat = False
        self.rounding = "nearest"
        for name in ("scale", "zero_point", "x_min", "x_max", "step_scale", "step_zero_point"):
            self.register_buffer(name, torch.empty(0))
        self.alpha: nn.Parameter | None = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    @property
    def has_step_tables(self) -> bool:
        return self.step_scale.numel() > 0

    @property
    def qmin(self) -> int:
        return F.qrange(self.n_bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return F.qrange(self.n_bits, self.symmetric)[1]

    def reset(self) -> None:
        """Forget the range (used before each step's FSC calibration)."""
        for name in ("scale", "zero_point", "x_min", "x_max"):
            setattr(self, name, torch.empty(0, device=self.scale.device))

    def _shape(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (x.dim() - 1))) if self.per_channel else v.reshape(())

    def _extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_channel:
            lo, hi = torch.aminmax(x.detach().reshape(x.shape[0], -1), dim=1)  # one pass for both
            return self._shape(x, lo), self._shape(x, hi)
        return torch.aminmax(x.detach())

    def init_range(self, x: torch.Tensor) -> None:
        """Set (scale, zero_point) from ``x`` by the ``init`` rule; keep the raw extremes for a later EMA."""
        self.x_min, self.x_max, self.scale, self.zero_point = self._init_params(x)

    def _init_params(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(x_min, x_max, scale, zero_point) the ``init`` rule gives on ``x``, without changing the state."""
        lo, hi = self._extremes(x)
        if self.init == "lp" and not self.symmetric:
            s, z = F.lp_search_params(
                x, self.n_bits, self.p, per_channel=self.per_channel, always_zero=self.always_zero
            )
            return lo.clone(), hi.clone(), self._shape(x, s), self._shape(x, z)
        if self.init == "max" or (self.init == "lp" and self.symmetric):
            # a symmetric Lp search is inconsistent in QD (§9 Q5) and unused by its recipes: 'max' instead
            s, z = F.qdiff_max_params(lo, hi, self.n_bits, self.always_zero, self.symmetric)
        elif self.ema == "raw" and self.running_stat:
            s, z = F.raw_range_params(lo, hi, self.n_bits, self.always_zero, self.symmetric)
        else:
            s, z = F.minmax_params(lo, hi, self.n_bits, self.always_zero, self.symmetric)
        return lo.clone(), hi.clone(), s, z

    def _set_from_extremes(self) -> None:
        if self.ema == "raw" and self.running_stat:
            s, z = F.raw_range_params(self.x_min, self.x_max, self.n_bits, self.always_zero, self.symmetric)
        else:
            s, z = F.minmax_params(self.x_min, self.x_max, self.n_bits, self.always_zero, self.symmetric)
        self.scale, self.zero_point = s, z

    def _update_from(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """A later calibration batch with extremes (lo, hi): EMA, or widening for 'minmax'."""
        if self.running_stat:
            self.x_min = F.ema(self.x_min, lo, self.momentum)
            self.x_max = F.ema(self.x_max, hi, self.momentum)
        elif self.init == "minmax":
            self.x_min, self.x_max = torch.minimum(self.x_min, lo), torch.maximum(self.x_max, hi)
        else:
            return
        self._set_from_extremes()

    def observe(self, x: torch.Tensor) -> None:
        """One calibration batch: the first initialises (``init``), later ones update the range.

        With ``running_stat`` the raw extremes follow an EMA and (scale, z) is recomputed from them
        (``ema``: "zero_forced" as TFMQ, "raw" as Q-Diffusion's ``act_momentum_update``, §1.2c); without
        it an ``init="minmax"`` quantizer widens to the global min-max and the others keep their init.
        """
        if not self.initialized:
            self.init_range(x)
            return
        self._update_from(*self._extremes(x))

    # -- grouped calibration (FSC of several steps in one forward) ----------------------------
    def _grouped_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrate and fake-quantize ``groups`` equal, contiguous slices of the batch separately.

        Slice g (one sampling step's samples) gets exactly what ``observe`` + ``forward`` do to it alone:
        per-slice init, EMA and (scale, z), held as (G,) vectors. Every tensor a UNet quantizes keeps
        the batch as its leading dimension (attention heads as B * heads), so the slices stay contiguous.
        """
        g = self.groups
        if x.shape[0] % g:
            raise RuntimeError(f"grouped calibration: batch {x.shape[0]} is not {g} equal step slices")
        parts = x.reshape(g, x.shape[0] // g, *x.shape[1:])
        flat = x.reshape(g, -1)
        if self.observing:
            if not self.initialized:
                lo, hi, s, z = (torch.stack(v) for v in zip(*(self._init_params(p) for p in parts), strict=True))
                self.x_min, self.x_max, self.scale, self.zero_point = lo, hi, s, z
            else:
                self._update_from(*torch.aminmax(flat.detach(), dim=1))
        elif self.scale.shape != (g,):
            raise RuntimeError("grouped calibration needs the quantizer to observe first")
        return F.fake_quant(flat, self.scale[:, None], self.zero_point[:, None], self.qmin, self.qmax).reshape(x.shape)

    # -- per-step tables (FSC) -----------------------------------------------------------------
    def set_step_tables(self, scales: torch.Tensor, zero_points: torch.Tensor) -> None:
        self.step_scale, self.step_zero_point = scales, zero_points

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_step_tables:
            return self.scale, self.zero_point
        step = current_step()
        n = self.step_scale.shape[0]
        if step is None:
            raise StepNotCalibratedError(
                "this model has per-step activation tables but no sampling step is set: "
                "run it through the sampler (or inside tfmq_exp.quant.step_context(i))"
            )
        if not 0 <= step < n:
            raise StepNotCalibratedError(
                f"sampling step {step} was never calibrated: the per-step tables cover steps 0..{n - 1}. "
                f"Fix: sample with the {n}-step schedule used at calibration (sampler.steps={n})"
            )
        return self.step_scale[step], self.step_zero_point[step]

    # -- AdaRound ------------------------------------------------------------------------------
    def enable_adaround(self, w: torch.Tensor) -> None:
        if not self.initialized:
            self.init_range(w)
        self.alpha = nn.Parameter(F.adaround_init_alpha(w.detach(), self.scale))
        self.rounding = "soft"

    def regularizer(self, beta: float) -> torch.Tensor:
        assert self.alpha is not None
        return F.adaround_regularizer(self.alpha, beta)

    @torch.no_grad()
    def integer_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer grid values this quantizer maps ``x`` to (hard AdaRound or nearest), as int32."""
        scale, zp = self._params()
        if self.alpha is not None and self.rounding != "nearest":
            q = torch.floor(x / scale) + (self.alpha >= 0).to(x.dtype) + zp
        else:
            q = torch.round(x / scale) + zp
        return torch.clamp(q, self.qmin, self.qmax).to(torch.int32)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.groups:
            return self._grouped_forward(x)
        if self.observing:
            self.observe(x)
        elif not self.initialized and not self.has_step_tables:
            if self.per_channel:  # weights need no data: initialise lazily from the tensor itself
                self.init_range(x)
            else:
                raise RuntimeError("activation quantizer used before calibration; run calibrate_activations first")
        scale, zp = self._params()
        if self.rounding != "nearest" and self.alpha is not None:
            return F.adaround_weight(x, scale, zp, self.alpha, self.n_bits, hard=self.rounding == "hard")
        return F.fake_quant(x, scale, zp, self.qmin, self.qmax)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Buffers start empty; take the saved shapes before the strict copy.
        for name in ("scale", "zero_point", "x_min", "x_max", "step_scale", "step_zero_point"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        if prefix + "alpha" in state_dict and self.alpha is None:
            self.alpha = nn.Parameter(torch.empty_like(state_dict[prefix + "alpha"]))
            self.rounding = "hard"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        sym = ", symmetric" if self.symmetric else ""
        return (f"bits={self.n_bits}, {kind}{sym}, init={self.init}, enabled={self.enabled}, "
                f"rounding={self.rounding}")

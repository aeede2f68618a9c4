"""A traceable copy of a fake-quant UNet whose quantizers are ``torch.fake_quantize_*`` calls.

Runtimes that understand quantize-dequantize graphs (OpenVINO turns both calls into
``FakeQuantize`` and its CPU plugin runs the layer in int8) need the quantizers as those ops, with
constant ranges. The ranges are the checkpoint's own: per-channel weight scales and zero points
(the weights already sit on their grid, so the weight op is exact) and the input scales and zero
points, or the per-step tables (FSC). Three ways to carry the tables (``step_tables``):

* ``runtime`` (one model): the step index is a model input; each layer gathers its step's scale
  ``s`` and zero point ``z`` and rescales its input to a fixed unit grid, ``u = x / s + (z - Z)``,
  quantized by a constant FakeQuantize with zero point ``Z``. Because the integer codes ``c`` then
  carry the offset ``z - Z``, the output is corrected: ``y = s * (W * c - (z - Z) * K) + b`` with
  ``K = W * 1`` (the weight summed over the part of each window inside the image: a one-channel
  convolution of a ones image, so zero padding in ``x`` is reproduced exactly). Exact, and the
  convolution stays integer.
* ``per_step``: one model per step with that step's constants baked in (``build_deploy_model(step=i)``);
  the export converts one and stores the other steps' quantize ranges (``baked_step_ranges``).
* ``runtime_fq``: the gathered ranges feed the quantize op directly (kept for the measurement: the
  runtime then cannot fold them and runs the layer in floating point).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tfmq_exp.quant.modules import QuantMixin, quant_modules
from tfmq_exp.quant.quantizer import UniformQuantizer

STEP_MODES = ("runtime", "per_step", "runtime_fq")
_STEP: list[torch.Tensor | None] = [None]


@contextlib.contextmanager
def step_input(step: torch.Tensor) -> Iterator[None]:
    """Make the traced step-index input visible to every deploy layer during one forward."""
    prev = _STEP[0]
    _STEP[0] = step
    try:
        yield
    finally:
        _STEP[0] = prev


def _current_step() -> torch.Tensor:
    if _STEP[0] is None:
        raise RuntimeError("deploy layers with per-step tables need the step index (call through DeployUNet)")
    return _STEP[0]


class DeployActQuant(nn.Module):
    """Per-tensor activation quantizer as a ``fake_quantize`` op (constant, baked step, or gathered tables)."""

    def __init__(self, q: UniformQuantizer, mode: str, step: int | None) -> None:
        super().__init__()
        self.qmin, self.qmax = q.qmin, q.qmax
        self.tables = q.has_step_tables and step is None
        if q.has_step_tables and step is not None:
            s, z = q.step_scale[step], q.step_zero_point[step]
        else:
            s, z = q.scale, q.zero_point
        if self.tables:
            self.register_buffer("scale_t", q.step_scale.detach().float().reshape(-1).clone())
            self.register_buffer("zp_t", q.step_zero_point.detach().round().int().reshape(-1).clone())
        else:
            self.s, self.z = float(s.reshape(())), int(torch.round(z.reshape(())))
        # a baked step keeps every step's table (plain attributes, not traced): the other steps' models are
        # this one with other FakeQuantize constants (``baked_step_ranges``)
        self.baked_tables = None
        if q.has_step_tables and step is not None:
            self.baked_tables = (q.step_scale.detach().float().reshape(-1).clone(),
                                 q.step_zero_point.detach().round().float().reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tables:
            return torch.fake_quantize_per_tensor_affine(x, self.s, self.z, self.qmin, self.qmax)
        step = _current_step()
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale_t[step].reshape(1), self.zp_t[step].reshape(1), self.qmin, self.qmax
        )


class DeployLayer(nn.Module):
    """Conv2d/Linear with its quantized weight behind a per-channel ``fake_quantize`` op.

    Q-Diffusion's split shortcut (separate quantizers for input channels [split:]) becomes two
    partial products summed; each part has its own weight and input quantizer.
    """

    def __init__(self, mod: QuantMixin, mode: str, step: int | None) -> None:
        super().__init__()
        self.is_conv = isinstance(mod, nn.Conv2d)
        if self.is_conv:
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                raise ValueError("deploy export supports zero-padded convolutions with numeric padding only")
            self.stride, self.padding, self.dilation, self.groups = mod.stride, mod.padding, mod.dilation, mod.groups
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        with torch.no_grad():
            w = mod.quantized_weight() if any(q.enabled for q in mod.weight_quantizers()) else mod.weight
        w = w.detach().float()
        bounds = [(0, mod.split), (mod.split, w.shape[1])] if mod.split else [(0, w.shape[1])]
        wqs, aqs = mod.weight_quantizers(), mod.input_quantizers()
        self.bounds = bounds
        self.parts = nn.ModuleList(
            _Part(w[:, a:b], wq, aq, mode, step) for (a, b), wq, aq in zip(bounds, wqs, aqs)
        )
        if self.is_conv and self.groups != 1 and any(p.offset for p in self.parts):
            raise ValueError("deploy export of grouped convolutions needs weights on a symmetric int8 grid")

    def _op(self, x: torch.Tensor, w: torch.Tensor, padded: bool) -> torch.Tensor:
        if not self.is_conv:
            return F.linear(x, w)
        pad = 0 if padded else self.padding
        return F.conv2d(x, w, None, self.stride, pad, self.dilation, self.groups)

    def _bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias.reshape(1, -1, 1, 1) if self.is_conv else self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x, self, self._bias())
        y = None
        for (a, b), part in zip(self.bounds, self.parts):
            yi = part(x[:, a:b], self, None)
            y = yi if y is None else y + yi
        bias = self._bias()
        return y if bias is None else y + bias


class _Part(nn.Module):
    """One (weight slice, input quantizer) pair of a DeployLayer.

    The integer kernels take symmetric int8 weights (no per-channel weight zero point), so a
    weight ``s * (q - z)`` whose codes ``q - z`` leave [-128, 127] (8-bit asymmetric grids) is
    split exactly into ``s * (q - 128)`` (int8) plus ``r = s * (128 - z)`` per output channel times
    the box sum of the quantized input (all input channels, the kernel window): one small
    floating-point reduction beside the integer layer.
    """

    def __init__(self, w: torch.Tensor, wq: UniformQuantizer, aq: UniformQuantizer, mode: str, step: int | None):
        super().__init__()
        self.w_quant = wq.enabled
        self.offset = False
        if self.w_quant:
            s = wq.scale.detach().double().reshape(-1)
            z = wq.zero_point.detach().double().round().reshape(-1)
            shape = (-1,) + (1,) * (w.dim() - 1)
            codes = torch.round(w.double() / s.reshape(shape)) + z.reshape(shape)
            rel = (codes - z.reshape(shape)).reshape(len(s), -1)
            fits = (rel.min(1).values >= -128) & (rel.max(1).values <= 127)
            k = torch.where(fits, torch.zeros_like(z), 128.0 - z)  # per-channel shift onto the int8 grid
            self.offset = bool((k != 0).any())
            w = (s.reshape(shape) * (rel.reshape(w.shape) - k.reshape(shape))).float()
            self.register_buffer("w_scale", s.float())
            self.register_buffer("w_zp", torch.zeros(len(s), dtype=torch.int32))
            if self.offset:
                r = (s * k).float()
                self.register_buffer("w_offset", r.reshape(1, -1, 1, 1) if w.dim() == 4 else r)
                self.register_buffer("box", torch.ones(1, 1, *w.shape[2:]) if w.dim() == 4 else torch.ones(0))
        self.register_buffer("weight", w.contiguous().clone())
        self.a_quant = aq.enabled
        self.rescale = aq.enabled and aq.has_step_tables and step is None and mode == "runtime"
        if self.rescale:
            s = aq.step_scale.detach().double().reshape(-1)
            z = aq.step_zero_point.detach().double().round().reshape(-1)
            self.grid_zp = int(z.median().item())  # Z: the fixed zero point of the unit grid
            self.same_zp = bool((z == z[0]).all()) and (aq.qmin, aq.qmax) == (0, 255)
            self.register_buffer("inv_s_t", (1.0 / s).float())
            self.register_buffer("s_t", s.float())
            self.register_buffer("shift_t", (z - self.grid_zp).float())  # z - Z per step
            self.register_buffer("corr_t", ((z - self.grid_zp) * s).float())  # (z - Z) * s per step
            self.a_qmin, self.a_qmax = aq.qmin, aq.qmax
            # the sum of the full weight per output: its own constant, so the weight quantize op keeps a
            # single consumer and folds into the integer kernel
            full = self.weight.double() + (self.w_offset.reshape((-1,) + (1,) * (w.dim() - 1)) if self.offset else 0)
            w_sum = full.sum(dim=tuple(range(1, w.dim()))).float()
            self.register_buffer("w_sum", w_sum.reshape(1, -1, 1, 1) if w.dim() == 4 else w_sum)
            if w.dim() == 4:
                self.register_buffer("w_sum_k", full.sum(1, keepdim=True).float())  # (C_out, 1, kh, kw)
                self.register_buffer("ones_1hw", torch.ones(1, 1, 1, 1))
        elif self.a_quant:
            self.act = DeployActQuant(aq, mode, step)

    def quant_weight(self) -> torch.Tensor:
        if not self.w_quant:
            return self.weight
        return torch.fake_quantize_per_channel_affine(self.weight, self.w_scale, self.w_zp, 0, -128, 127)

    def _apply(self, c: torch.Tensor, layer: DeployLayer, padded: bool) -> torch.Tensor:
        """The layer's full quantized weight applied to ``c``: int8 product plus the offset correction."""
        y = layer._op(c, self.quant_weight(), padded)
        if not self.offset:
            return y
        if not layer.is_conv:
            return y + c.sum(-1, keepdim=True) * self.w_offset
        pad = 0 if padded else layer.padding
        box = F.conv2d(c.sum(1, keepdim=True), self.box, None, layer.stride, pad, layer.dilation)
        return y + box * self.w_offset

    def forward(self, x: torch.Tensor, layer: DeployLayer, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.rescale:
            if self.a_quant:
                x = self.act(x)
            y = self._apply(x, layer, padded=False)
            return y if bias is None else y + bias
        step = _current_step()
        if self.same_zp:  # one zero point for every step: only the scale moves, zero padding stays exact
            c = torch.fake_quantize_per_tensor_affine(x * self.inv_s_t[step], 1.0, self.grid_zp, 0, 255)
            y = self._apply(c, layer, padded=False)
            return y * self.s_t[step] if bias is None else y * self.s_t[step] + bias
        u = x * self.inv_s_t[step] + self.shift_t[step]
        c = torch.fake_quantize_per_tensor_affine(u, 1.0, self.grid_zp, self.a_qmin, self.a_qmax)
        y = self._apply(c, layer, padded=False)
        if layer.is_conv and any(p > 0 for p in layer.padding):
            # the convolution pads c with 0 where the fake-quant model pads x with 0 (code z, c = z - Z):
            # the difference is (z - Z) times the weight summed over the window's inside part, K; K comes
            # from a one-channel convolution of a ones image, built from the step input so that it is
            # not folded into a stored constant of the output's size
            ones = self.ones_1hw.expand(1, 1, x.shape[2], x.shape[3]) * (step * 0 + 1).to(x.dtype)
            k = F.conv2d(ones, self.w_sum_k, None, layer.stride, layer.padding, layer.dilation)
            shift = self.corr_t[step] * k
        else:
            shift = self.corr_t[step] * self.w_sum  # per output channel: one vector, then one add over the output
        return y * self.s_t[step] - (shift if bias is None else shift - bias)


class DeployUNet(nn.Module):
    """``(sample, timestep, step[, encoder_hidden_states]) -> eps`` around a deploy copy of the UNet."""

    def __init__(self, unet: nn.Module, conditional: bool) -> None:
        super().__init__()
        self.unet, self.conditional = unet, conditional

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, step: torch.Tensor, encoder_hidden_states=None  # noqa: ANN001
    ) -> torch.Tensor:
        with step_input(step):
            if self.conditional:
                return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]
            return self.unet(sample, timestep, return_dict=False)[0]


def _attention_quantizer_slots(unet: nn.Module) -> list[tuple[nn.Module, str, UniformQuantizer]]:
    slots = []
    for mod in unet.modules():
        if isinstance(mod, QuantMixin):
            continue
        for name, child in mod.named_children():
            if isinstance(child, UniformQuantizer):
                slots.append((mod, name, child))
    return slots


def has_step_tables(unet: nn.Module) -> bool:
    return any(isinstance(m, UniformQuantizer) and m.enabled and m.has_step_tables for m in unet.modules())


def step_table_groups(unet: nn.Module) -> list[list[int]]:
    """Steps whose activation tables are equal in every quantizer, grouped (first step of each group first)."""
    tables = [m for m in unet.modules() if isinstance(m, UniformQuantizer) and m.enabled and m.has_step_tables]
    if not tables:
        return []
    n = tables[0].step_scale.shape[0]
    keys: dict[tuple, list[int]] = {}
    for i in range(n):
        key = tuple((float(q.step_scale[i]), float(q.step_zero_point[i])) for q in tables)
        keys.setdefault(key, []).append(i)
    return list(keys.values())


FQ_SUFFIX = "/aten::fake_quantize_per_tensor_affine/FakeQuantize"  # the converter's name of a quantizer's node


def baked_step_ranges(deploy: DeployUNet, steps: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For a ``per_step`` deploy model: the FakeQuantize node name of every activation quantizer with
    tables, and its range ends ``(qmin - z) * s`` and ``(qmax - z) * s`` at each of ``steps`` (float32,
    what the converter writes for a baked step; checked against the converted model by the export)."""
    out = {}
    for name, mod in deploy.named_modules():
        if isinstance(mod, DeployActQuant) and mod.baked_tables is not None:
            s, z = (t[steps] for t in mod.baked_tables)
            out["__module." + name + FQ_SUFFIX] = ((mod.qmin - z) * s, (mod.qmax - z) * s)
    return out


@torch.no_grad()
def build_deploy_model(qunet: nn.Module, mode: str = "runtime", step: int | None = None) -> DeployUNet:
    """A deploy copy of a quantized UNet (the original is left as it is).

    ``step`` bakes that step's tables in as constants (``per_step``); otherwise ``mode`` decides
    how the tables are carried (see the module docstring).
    """
    if mode not in STEP_MODES:
        raise ValueError(f"unknown step-table mode '{mode}' (use one of {list(STEP_MODES)})")
    unet = copy.deepcopy(qunet).float().eval()
    for name, mod in list(quant_modules(unet)):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, DeployLayer(mod, mode, step))
    for parent, name, q in _attention_quantizer_slots(unet):
        setattr(parent, name, DeployActQuant(q, mode, step) if q.enabled else nn.Identity())
    unet.requires_grad_(False)
    conditional = "encoder_hidden_states" in _forward_params(unet)
    return DeployUNet(unet, conditional).eval()


def _forward_params(unet: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(unet.forward).parameters)

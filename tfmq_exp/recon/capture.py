"""Capture a unit's inputs (args and kwargs) or output over a calibration pool with hooks.

The hook stops the forward pass at the unit, so caching a unit costs only the model prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tfmq_exp.progress import progress_bar as tqdm


class _Stop(Exception):
    pass


@dataclass
class CachedCall:
    """A unit's call over N samples: batch tensors concatenated on dim 0, everything else kept once."""

    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    n: int = 0

    def select(self, idx: torch.Tensor, device: torch.device | str | None = None) -> tuple[list[Any], dict[str, Any]]:
        def pick(v: Any) -> Any:
            if isinstance(v, _Batched):
                t = v.data[idx]
                return t.to(device) if device is not None else t
            return v

        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


@dataclass
class _Batched:
    data: torch.Tensor


def to_float32(obj: Any) -> Any:
    """A capture (tensor, cached call, dict of tensors) with its floating tensors in float32: what a reduced-
    precision FP pass (``recon.fp_precision``) captured, in the precision the reconstruction runs in."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, _Batched):
        return _Batched(to_float32(obj.data))
    if isinstance(obj, CachedCall):
        return CachedCall([to_float32(a) for a in obj.args], {k: to_float32(v) for k, v in obj.kwargs.items()}, obj.n)
    if isinstance(obj, dict):
        return {k: to_float32(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_float32(v) for v in obj)
    return obj


def _merge(parts: list[Any], n_batch: list[int], storage: str | torch.device) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == n_batch[0]:
        return _Batched(torch.cat([p.detach().to(storage) for p in parts]))
    return first


def _cached_call(calls: list[tuple[Any, dict]], sizes: list[int], storage: str | torch.device) -> CachedCall:
    """The hooked calls of every batch as one call: batched arguments concatenated onto ``storage``."""
    args = [_merge([c[0][i] for c in calls], sizes, storage) for i in range(len(calls[0][0]))]
    kwargs = {k: _merge([c[1][k] for c in calls], sizes, storage) for k in calls[0][1]}
    return CachedCall(args, kwargs, sum(sizes))


def capture_inputs(
    model: nn.Module, unit: nn.Module, batches: Iterable[tuple[Any, ...]], run: Callable[[nn.Module, tuple], Any],
    storage: str | torch.device = "cpu", desc: str | None = None,
) -> CachedCall:
    """Inputs of ``unit`` when ``run(model, batch)`` is called for each batch."""
    calls: list[tuple[tuple, dict]] = []

    def hook(_m, args, kwargs):  # noqa: ANN001, ANN202
        calls.append((args, kwargs))
        raise _Stop

    h = unit.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sizes = _drive(model, batches, run, desc)
    finally:
        h.remove()
    return _cached_call(calls, sizes, storage)


def capture_outputs(
    model: nn.Module, unit: nn.Module, batches: Iterable[tuple[Any, ...]], run: Callable[[nn.Module, tuple], Any],
    storage: str | torch.device = "cpu", desc: str | None = None,
) -> torch.Tensor:
    """Outputs of ``unit`` (first tensor if it returns a tuple), concatenated over batches."""
    outs: list[torch.Tensor] = []

    def hook(_m, _args, out):  # noqa: ANN001, ANN202
        outs.append((out[0] if isinstance(out, tuple) else out).detach().to(storage))
        raise _Stop

    h = unit.register_forward_hook(hook)
    try:
        _drive(model, batches, run, desc)
    finally:
        h.remove()
    return torch.cat(outs)


def capture_io(
    model: nn.Module, unit: nn.Module, batches: Iterable[tuple[Any, ...]], run: Callable[[nn.Module, tuple], Any],
    storage: str | torch.device = "cpu", desc: str | None = None,
) -> tuple[CachedCall, torch.Tensor]:
    """Inputs and outputs of ``unit`` in one pass (what ``capture_inputs`` and ``capture_outputs`` give on the
    same model and batches, for the cost of the second alone)."""
    calls: list[tuple[tuple, dict]] = []
    outs: list[torch.Tensor] = []

    def pre(_m, args, kwargs):  # noqa: ANN001, ANN202
        # copies: the unit runs after this hook and may change an input in place
        snap = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
        calls.append((snap, {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))

    def post(_m, _args, out):  # noqa: ANN001, ANN202
        outs.append((out[0] if isinstance(out, tuple) else out).detach().to(storage))
        raise _Stop

    handles = [unit.register_forward_pre_hook(pre, with_kwargs=True), unit.register_forward_hook(post)]
    try:
        sizes = _drive(model, batches, run, desc)
    finally:
        for h in handles:
            h.remove()
    return _cached_call(calls, sizes, storage), torch.cat(outs)


class FPCache:
    """FP inputs and outputs of units, captured by the weight stage and kept for the activation stage, which
    needs exactly these (same FP model, same pool, same batches): it then runs no forward of its own. A unit is
    kept when it fits in what is left of ``budget_bytes``; the activation stage recaptures the others."""

    def __init__(self, budget_bytes: float) -> None:
        self.budget, self.used = float(budget_bytes), 0
        self.units: dict[str, tuple[CachedCall, torch.Tensor]] = {}

    def offer(self, name: str, inputs: CachedCall, outputs: torch.Tensor) -> bool:
        size = outputs.nbytes + sum(v.data.nbytes for v in [*inputs.args, *inputs.kwargs.values()]
                                    if isinstance(v, _Batched))
        if self.used + size > self.budget:
            return False
        self.units[name] = (inputs, outputs)
        self.used += size
        return True

    def take(self, name: str) -> tuple[CachedCall, torch.Tensor] | None:
        """A kept unit's (inputs, outputs), released from the cache."""
        return self.units.pop(name, None)


def _drive(model: nn.Module, batches: Iterable[tuple[Any, ...]], run: Callable[[nn.Module, tuple], Any],
           desc: str | None = None) -> list[int]:
    """Run every batch until the hook stops it; returns the batch sizes."""
    sizes = []
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, leave=False, mininterval=2.0, disable=desc is None, unit="batch"):
            try:
                run(model, b)
            except _Stop:
                pass
            sizes.append(int(b[0].shape[0]))
    return sizes

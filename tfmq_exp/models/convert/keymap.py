"""Bookkeeping for one conversion: which original keys were used, which targets were filled.

Every converter writes target keys through a :class:`KeyMap`; :meth:`KeyMap.finish` then
checks the result against the state dict (or only the shapes) of the diffusers module, so a
mapping that forgets an original key, leaves a target empty or gets a shape wrong fails with
one line instead of loading silently with ``strict=False``. The helpers work on meta tensors
too (views and slices only), which is how the full-size key lists are checked without memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tfmq_exp.errors import UserError

Tensor = torch.Tensor


class ConversionError(UserError):
    """An original state dict does not fit the model its config describes."""


class KeyMap:
    """Collects ``target key -> tensor`` from an original state dict, recording the keys used."""

    def __init__(self, source: Mapping[str, Tensor], what: str) -> None:
        self.source = source
        self.what = what
        self.used: set[str] = set()
        self.out: dict[str, Tensor] = {}

    def take(self, key: str) -> Tensor:
        if key not in self.source:
            raise ConversionError(
                f"{self.what}: the original key '{key}' is missing. Fix: check that the checkpoint "
                "belongs to this model option (its original config must match the checkpoint)."
            )
        self.used.add(key)
        return self.source[key]

    def put(self, target: str, tensor: Tensor) -> None:
        if target in self.out:
            raise ConversionError(f"{self.what}: target key '{target}' written twice (converter bug)")
        self.out[target] = tensor

    def copy(self, target: str, source: str, fn: Callable[[Tensor], Tensor] | None = None) -> None:
        t = self.take(source)
        self.put(target, fn(t) if fn else t)

    def layer(self, target: str, source: str, fn: Callable[[Tensor], Tensor] | None = None, bias: bool = True) -> None:
        """``weight`` (through ``fn``) and, if present, ``bias`` of one layer."""
        self.copy(f"{target}.weight", f"{source}.weight", fn)
        if bias and f"{source}.bias" in self.source:
            self.copy(f"{target}.bias", f"{source}.bias")

    def subtree(self, target: str, source: str) -> None:
        """Every original key under ``source.`` renamed to ``target.`` (identical layouts)."""
        keys = [k for k in self.source if k.startswith(source + ".")]
        if not keys:
            self.take(source + ".weight")  # raises the missing-key error
        for k in keys:
            self.copy(target + k[len(source) :], k)

    def finish(self, target_shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
        """Check completeness and shapes against the target module; return the converted dict."""
        leftover = sorted(set(self.source) - self.used)
        missing = sorted(set(target_shapes) - set(self.out))
        extra = sorted(set(self.out) - set(target_shapes))
        bad = [k for k in self.out if k in target_shapes and tuple(self.out[k].shape) != tuple(target_shapes[k])]
        problems = []
        if leftover:
            problems.append(f"{len(leftover)} original keys not used (first: {leftover[0]})")
        if missing:
            problems.append(f"{len(missing)} target keys not filled (first: {missing[0]})")
        if extra:
            problems.append(f"{len(extra)} keys the target module lacks (first: {extra[0]})")
        if bad:
            k = bad[0]
            problems.append(
                f"{len(bad)} shape mismatches (first: {k} {tuple(self.out[k].shape)} vs {tuple(target_shapes[k])})"
            )
        if problems:
            raise ConversionError(
                f"{self.what}: the checkpoint does not match its config: {'; '.join(problems)}. "
                "Fix: use the checkpoint this model option describes, or the model option of your checkpoint."
            )
        return self.out


def shapes_of(module: torch.nn.Module) -> dict[str, torch.Size]:
    """Shapes of a module's state dict (works on the meta device)."""
    return {k: v.shape for k, v in module.state_dict().items()}


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` with the prefix removed (``prefix=''`` keeps everything)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def squeeze_1x1(t: Tensor) -> Tensor:
    """A 1x1 convolution weight ([out, in, 1] or [out, in, 1, 1]) as a linear weight [out, in]."""
    return t.reshape(t.shape[0], t.shape[1])


def resnet(m: KeyMap, target: str, source: str, names: Mapping[str, str]) -> None:
    """A residual block whose layers map one to one; ``names`` maps target layer -> source layer.

    Optional layers (the shortcut conv, the time projection) are mapped only when present in
    the source; a target that expects one is then reported by :meth:`KeyMap.finish`.
    """
    for tgt, src in names.items():
        if f"{source}.{src}.weight" in m.source:
            m.layer(f"{target}.{tgt}", f"{source}.{src}")


def attention_from_convs(m: KeyMap, target: str, source: str, q: str, k: str, v: str, norm: str, out: str) -> None:
    """A single-head attention with 1x1-conv q/k/v/out (taming / ddim ``AttnBlock``)."""
    m.layer(f"{target}.group_norm", f"{source}.{norm}")
    m.layer(f"{target}.to_q", f"{source}.{q}", squeeze_1x1)
    m.layer(f"{target}.to_k", f"{source}.{k}", squeeze_1x1)
    m.layer(f"{target}.to_v", f"{source}.{v}", squeeze_1x1)
    m.layer(f"{target}.to_out.0", f"{source}.{out}", squeeze_1x1)


def load_converted(module: torch.nn.Module, state: Mapping[str, Tensor], assign: bool = False) -> torch.nn.Module:
    """Load a converted (already checked) state dict into a module, as float32.

    ``assign=True`` takes the tensors themselves, for a module built on the meta device (no
    random initialisation of weights that are overwritten anyway).
    """
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=assign)
    return module

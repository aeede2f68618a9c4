"""Packed checkpoints: the quantized checkpoint with 4-bit (and smaller) codes two per byte.

``quantized.safetensors`` (tfmq_exp.quant.state) stores every weight code in a byte. Here codes of
at most 4 bits are packed two per byte (low nibble first, flattened in C order); 8-bit codes keep
their byte. Scales, zero points, per-step tables and FP layers are stored as they are, and the
header (recipe, splits, meta) is copied, so ``unpack`` gives back the original checkpoint's tensors
and ``load_packed`` rebuilds the same model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from tfmq_exp.quant.state import INT_SUFFIX, load_quantized

PACKED_SUFFIX = ".weight_int4"
FORMAT = "tfmq-exp-packed/1"


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] -> uint8, two per byte (element 2i in the low nibble, 2i+1 in the high one)."""
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < 0 or flat.max() > 15):
        raise ValueError("pack_int4 needs codes in [0, 15]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 codes of ``shape``."""
    p = packed.reshape(-1).to(torch.int16)
    both = torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)
    n = 1
    for d in shape:
        n *= d
    return both[:n].to(torch.uint8).reshape(shape)


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        md = dict(f.metadata() or {})
    return load_file(str(path)), md


def pack_checkpoint(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write the packed form of a quantized checkpoint; returns {layers packed, bytes before/after}."""
    from safetensors.torch import save_file

    state, md = _read(src)
    int_layers = json.loads(md.get("int_layers", "[]"))
    recipe = json.loads(md["recipe"])
    packed_shapes: dict[str, list[int]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        name = key[: -len(INT_SUFFIX)] if key.endswith(INT_SUFFIX) else None
        if name in int_layers and int(t.max()) <= 15 and _weight_bits(recipe, name, md) <= 4:
            out[name + PACKED_SUFFIX] = pack_int4(t)
            packed_shapes[name] = list(t.shape)
        else:
            out[key] = t
    md_out = dict(md, packed=json.dumps(packed_shapes), packed_format=FORMAT)
    dst = Path(dst)
    save_file(out, str(dst), metadata=md_out)
    return {"packed_layers": len(packed_shapes), "bytes_in": Path(src).stat().st_size, "bytes_out": dst.stat().st_size}


def _weight_bits(recipe: dict[str, Any], name: str, md: dict[str, str]) -> int:
    """Bits of a layer's weight codes: the stored bit width per layer when present, else the recipe's."""
    bits = json.loads(md.get("weight_bits", "{}"))
    if name in bits:
        return int(bits[name])
    from tfmq_exp.quant.recipe import QuantRecipe

    return QuantRecipe.from_dict(recipe).plan(name).weight_bits


def unpack(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A packed checkpoint's tensors and header in the unpacked (tfmq-exp/1) layout."""
    state, md = _read(path)
    shapes = json.loads(md.get("packed", "{}"))
    out = {}
    for key, t in state.items():
        if key.endswith(PACKED_SUFFIX):
            name = key[: -len(PACKED_SUFFIX)]
            out[name + INT_SUFFIX] = unpack_int4(t, tuple(shapes[name]))
        else:
            out[key] = t
    md = {k: v for k, v in md.items() if k not in ("packed", "packed_format")}
    return out, md


def is_packed(path: str | Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("packed_format") == FORMAT


def load_packed(fp_model: torch.nn.Module, path: str | Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the quantized model from a packed checkpoint (same result as the unpacked one)."""
    from safetensors.torch import save_file

    state, md = unpack(path)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "quantized.safetensors"
        save_file(state, str(plain), metadata=md)
        return load_quantized(fp_model, plain)

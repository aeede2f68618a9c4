"""Quantized checkpoints: one safetensors file with integer weights (after hard rounding), scales,
zero points, per-step activation tables and, in its metadata, the recipe that rebuilds the model.

Reloading dequantizes the integer weights ((q - z) * s) and keeps nearest rounding, which maps
them back to the same integers: the reloaded model computes the same outputs bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tfmq_exp.quant.modules import QuantMixin, quant_modules
from tfmq_exp.quant.recipe import QuantRecipe
from tfmq_exp.quant.swap import swap_modules

INT_SUFFIX = ".weight_int"


def _halves(mod: QuantMixin) -> list[tuple[Any, slice]]:
    if mod.split:
        return [(mod.weight_quantizer, slice(0, mod.split)), (mod.weight_quantizer_split, slice(mod.split, None))]
    return [(mod.weight_quantizer, slice(None))]


def _int_dtype(n_bits: int) -> torch.dtype:
    return torch.uint8 if n_bits <= 8 else torch.int32


def export_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """State dict with each weight-quantized layer's FP weight and AdaRound alpha replaced by integers."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    int_layers = []
    for name, mod in quant_modules(model):
        if not mod.allow_weight_quant:
            continue
        codes = [q.integer_codes(mod.weight[:, sl]) for q, sl in _halves(mod)]
        state[f"{name}{INT_SUFFIX}"] = torch.cat(codes, 1).to(_int_dtype(mod.weight_quantizer.n_bits)).contiguous()
        del state[f"{name}.weight"]
        for q_name in ("weight_quantizer", "weight_quantizer_split"):
            state.pop(f"{name}.{q_name}.alpha", None)
        int_layers.append(name)
    return state, int_layers


def save_quantized(model: nn.Module, recipe: QuantRecipe, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    splits = {name: mod.split for name, mod in quant_modules(model) if mod.split}
    state, int_layers = export_state(model)
    header = {"recipe": json.dumps(recipe.to_dict()), "splits": json.dumps(splits), "meta": json.dumps(meta or {}),
              "int_layers": json.dumps(int_layers), "format": "tfmq-exp/1"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=header)
    tmp.replace(path)  # never leave a half-written checkpoint under the final name
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    if "recipe" not in md:
        raise ValueError("not a tfmq-exp quantized checkpoint (no recipe in its metadata)")
    return {k: json.loads(md.get(k, "{}")) for k in ("recipe", "splits", "meta")} | {
        "int_layers": json.loads(md.get("int_layers", "[]"))
    }


@torch.no_grad()
def load_quantized(fp_model: nn.Module, path: str | Path) -> tuple[nn.Module, QuantRecipe, dict[str, Any]]:
    """Rebuild the quantized model on top of an FP model of the same architecture (in place)."""
    from safetensors.torch import load_file

    header = read_header(path)
    recipe = QuantRecipe.from_dict(header["recipe"])
    swap_modules(fp_model, recipe, header["splits"])
    state = load_file(str(path))
    modules = dict(fp_model.named_modules())
    int_weights = {name: state.pop(f"{name}{INT_SUFFIX}") for name in header["int_layers"]}
    missing, unexpected = fp_model.load_state_dict(state, strict=False)
    expected_missing = {f"{n}.weight" for n in int_weights}
    if set(missing) != expected_missing or unexpected:
        extra = sorted(set(missing) - expected_missing)[:3] + list(unexpected)[:3]
        raise ValueError(f"checkpoint does not match the model: {extra}")
    for name, codes in int_weights.items():
        mod = modules[name]
        w = torch.empty_like(mod.weight)
        for q, sl in _halves(mod):
            w[:, sl] = (codes[:, sl].float() - q.zero_point) * q.scale
            q.rounding, q.alpha = "nearest", None
        mod.weight.copy_(w)
    return fp_model, recipe, header["meta"]

"""Architecture adapter for diffusers ``UNet2DModel`` and ``UNet2DConditionModel``.

It answers, from module names and classes, what the quantization methods need to know:

* ``reconstruction_units``: blocks and stand-alone layers for block/layer reconstruction (§1.4, §2);
* ``tib_modules`` / ``temporal_layer_names`` / ``time_embedding_output`` / ``tib_features``:
  the Temporal Information Block (§5.3);
* ``fp_rules``: each method's full-precision exceptions as ``QuantRule`` lists (§4.1, §5.1, §3.2);
* ``split_points``: Q-Diffusion's split-shortcut layers (§4.2);
* ``install_attention_quantizers`` (re-exported from ``tfmq_exp.models.attention``): q/k/v/softmax
  quantizers (§4.1, §9 D2);
* ``describe``: counts for logs.

Unit order (§1.4, §9 T5). ``order="registration"`` walks ``named_children`` recursively in
registration order, as TFMQ and QD do. In diffusers that order differs from the forward order in
two places, unlike the LDM ``openaimodel`` UNet whose registration order is the forward order:

* the UNet registers ``down_blocks``, ``up_blocks`` and only then ``mid_block`` (the mid block is
  assigned after the up blocks are built), so the mid block comes after every up block;
* ``Attn*Block2D`` / ``CrossAttn*Block2D`` / mid blocks register ``attentions`` before ``resnets``,
  while the forward pass runs resnet_i, then attention_i.

``up_blocks`` itself is registered in forward order (unlike DDIM's reversed ``up`` list, §9 T5).
``order="forward"`` returns the same units sorted by the first call in a traced forward pass,
which matches what the original LDM code's registration order gives. With asym input caching the
order decides which upstream units are already hard-rounded when a unit is reconstructed.

Supported: UNets without ``addition_embed_type`` (SDXL/Kandinsky added embeddings raise
``NotImplementedError``). Works on FP models and on models whose Conv2d/Linear layers are already
swapped to ``QuantConv2d``/``QuantLinear`` (they are still ``nn.Conv2d``/``nn.Linear``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tfmq_exp.models.attention import (
    QuantAttnProcessor,
    attention_modules,
    attention_quantizers,
    install_attention_quantizers,
    set_attention_quant_state,
)
from tfmq_exp.quant.recipe import QuantRule

__all__ = [
    "METHODS",
    "QuantAttnProcessor",
    "Unit",
    "attention_modules",
    "attention_quantizers",
    "block_classes",
    "describe",
    "example_inputs",
    "fp_rules",
    "install_attention_quantizers",
    "reconstruction_units",
    "resnet_blocks",
    "set_attention_quant_state",
    "split_points",
    "temporal_layer_names",
    "tib_features",
    "tib_modules",
    "time_embedding_output",
]

METHODS = ("rtn", "brecq", "qdiff", "tfmq")
# Modules that compute ``emb`` (the TIB's input side); their layers are not reconstruction units.
TIB_CHILDREN = ("time_proj", "time_embedding", "class_embedding")
LAYER_TYPES = (nn.Conv2d, nn.Linear)


@dataclass
class Unit:
    """One reconstruction unit: a block (``kind="block"``) or a stand-alone layer (``kind="layer"``)."""

    name: str
    module: nn.Module
    kind: str  # "block" | "layer"


# -- class look-ups ------------------------------------------------------------------------------


def _diffusers_classes() -> dict[str, type[nn.Module]]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D

    return {
        "ResnetBlock2D": ResnetBlock2D,
        "ResnetBlockCondNorm2D": ResnetBlockCondNorm2D,
        "Attention": Attention,
        "BasicTransformerBlock": BasicTransformerBlock,
    }


def block_classes() -> tuple[type[nn.Module], ...]:
    """Classes reconstructed as one block (§2): resnets, stand-alone Attention, transformer blocks.

    A diffusers ``Attention`` that is not inside a ``BasicTransformerBlock`` (the LDM-style
    ``AttentionBlock`` of UNet2DModel) is always a block here, whatever the activation setting.
    The original LDM code splits it into layers + weightless matmul blocks when activation
    quantization is on (§2, §9 T6); this adapter does not reproduce that partition change.
    """
    c = _diffusers_classes()
    return (c["ResnetBlock2D"], c["ResnetBlockCondNorm2D"], c["Attention"], c["BasicTransformerBlock"])


def _is_condition_model(unet: nn.Module) -> bool:
    return type(unet).__name__ == "UNet2DConditionModel" or hasattr(unet, "get_time_embed")


def _check_supported(unet: nn.Module) -> None:
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise NotImplementedError(
            f"addition_embed_type={unet.config.addition_embed_type!r} (SDXL/Kandinsky added embeddings) is not "
            "supported by the UNet adapter: its embedding is part of the temporal path"
        )


def resnet_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every diffusers ``ResnetBlock2D``, in registration order."""
    cls = _diffusers_classes()["ResnetBlock2D"]
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, cls)]


# -- 1. reconstruction units ---------------------------------------------------------------------


def tib_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """The modules that build ``emb``: ``time_proj``, ``time_embedding`` and ``class_embedding`` if any.

    They are not reconstruction units: TFMQ reconstructs the TIB (these linears plus every resnet's
    ``time_emb_proj``) separately (§5.4); the other methods' engines must reconstruct the
    ``time_embedding`` linears as layer units explicitly if they want QD's behaviour, where the
    time-embedding linears are single-layer units (§2).
    """
    _check_supported(unet)
    out = {}
    for name in TIB_CHILDREN:
        mod = getattr(unet, name, None)
        if isinstance(mod, nn.Module):
            out[name] = mod
    return out


def _walk_units(module: nn.Module, prefix: str, blocks: tuple, skip: set[int], seen: set[int], out: list[Unit]) -> None:
    for child_name, child in module.named_children():
        if id(child) in seen or id(child) in skip:
            continue
        seen.add(id(child))
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, blocks):
            out.append(Unit(name, child, "block"))
        elif isinstance(child, LAYER_TYPES):
            out.append(Unit(name, child, "layer"))
        else:
            _walk_units(child, name, blocks, skip, seen, out)


def reconstruction_units(
    unet: nn.Module, order: str = "registration", example: dict[str, Any] | None = None
) -> list[Unit]:
    """Blocks and stand-alone Conv2d/Linear layers, in ``order`` ("registration" or "forward").

    A unit never nests in another; blocks contain their layers (including a resnet's
    ``time_emb_proj``, which TFMQ leaves to the TIB, §5.5). The TIB-side modules
    (``tib_modules``) are excluded. ``order="forward"`` runs one small forward pass
    (``example`` kwargs, default ``example_inputs(unet)``); run it on the FP model, before
    activation quantizers exist, or pass inputs that work for the current state.
    """
    if order not in ("registration", "forward"):
        raise ValueError(f"unknown unit order '{order}' (use 'registration' or 'forward')")
    skip = {id(m) for m in tib_modules(unet).values()}
    units: list[Unit] = []
    _walk_units(unet, "", block_classes(), skip, set(), units)
    if order == "forward":
        units = _forward_sorted(unet, units, example)
    return units


def example_inputs(unet: nn.Module, batch_size: int = 1) -> dict[str, Any]:
    """Small keyword inputs for one forward pass of ``unet`` (structure tracing, not calibration)."""
    cfg = unet.config
    n_levels = len(cfg.block_out_channels)
    size = 2 ** (n_levels + 1)
    param = next(unet.parameters())
    kw: dict[str, Any] = {
        "sample": torch.randn(batch_size, cfg.in_channels, size, size, device=param.device, dtype=param.dtype),
        "timestep": torch.full((batch_size,), 10, dtype=torch.long, device=param.device),
    }
    if _is_condition_model(unet):
        dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
        if isinstance(dim, list | tuple):
            dim = dim[0]
        kw["encoder_hidden_states"] = torch.randn(batch_size, 2, dim, device=param.device, dtype=param.dtype)
    cls_emb = getattr(unet, "class_embedding", None)
    if isinstance(cls_emb, nn.Embedding) or getattr(cfg, "class_embed_type", None) == "timestep":
        kw["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=param.device)
    elif cls_emb is not None:
        in_dim = getattr(cfg, "projection_class_embeddings_input_dim", None) or cls_emb_in_features(cls_emb)
        kw["class_labels"] = torch.zeros(batch_size, in_dim, device=param.device, dtype=param.dtype)
    return kw


def cls_emb_in_features(mod: nn.Module) -> int:
    for m in mod.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError("cannot infer the class-embedding input width: pass example inputs")


@torch.no_grad()
def _forward_sorted(unet: nn.Module, units: list[Unit], example: dict[str, Any] | None) -> list[Unit]:
    first_call: dict[int, int] = {}
    handles = []
    for i, unit in enumerate(units):

        def hook(_mod, _args, i=i):
            first_call.setdefault(i, len(first_call))

        handles.append(unit.module.register_forward_pre_hook(hook))
    try:
        unet(**(example if example is not None else example_inputs(unet)))
    finally:
        for h in handles:
            h.remove()
    # Units never called keep their registration position, after the called ones.
    return [units[i] for i in sorted(range(len(units)), key=lambda i: (i not in first_call, first_call.get(i, i)))]


# -- 2. temporal information block ---------------------------------------------------------------


def temporal_layer_names(unet: nn.Module) -> list[str]:
    """The TIB's Linear layers (§5.3): time-embedding MLP, class-embedding linears, every ``time_emb_proj``.

    Order: ``time_embedding.*`` linears (``linear_1``, ``linear_2``, and ``cond_proj`` if the
    model has one), then the class embedding's linears where it has any (``class_embed_type``
    "timestep"/"projection": ``class_embedding.linear_1/2``; "simple_projection": the Linear
    itself), then each resnet's ``time_emb_proj`` in registration order. An ``nn.Embedding``
    (``num_class_embeds``) or ``nn.Identity`` class embedding has no Linear: it is neither listed
    nor quantized (the swap only wraps Conv2d/Linear), so it stays FP.
    """
    names: list[str] = []
    for prefix, mod in tib_modules(unet).items():
        if isinstance(mod, nn.Linear):
            names.append(prefix)
            continue
        names += [f"{prefix}.{n}" for n, m in mod.named_modules() if n and isinstance(m, nn.Linear)]
    for name, res in resnet_blocks(unet):
        if res.time_emb_proj is not None:
            names.append(f"{name}.time_emb_proj")
    return names


def _as_timesteps(timesteps: Any, batch_size: int | None, device: torch.device, cond: bool) -> torch.Tensor:
    if not torch.is_tensor(timesteps):
        dtype = torch.float64 if (cond and isinstance(timesteps, float)) else torch.long
        if device.type == "mps" and dtype == torch.float64:  # pragma: no cover - as diffusers does
            dtype = torch.float32
        timesteps = torch.tensor([timesteps], dtype=dtype, device=device)
    elif timesteps.dim() == 0:
        timesteps = timesteps[None].to(device)
    n = batch_size if batch_size is not None else timesteps.shape[0]
    if cond:
        return timesteps.expand(n)
    return timesteps * torch.ones(n, dtype=timesteps.dtype, device=timesteps.device)


def time_embedding_output(
    unet: nn.Module,
    timesteps: torch.Tensor | float | int,
    class_labels: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """``emb`` exactly as the UNet's forward builds it and hands it to every resnet.

    UNet2DModel: ``time_embedding(time_proj(t))`` (+ ``class_embedding(...)``; a "timestep"
    class embedding sees ``time_proj(labels)``). UNet2DConditionModel adds: ``timestep_cond`` to
    ``time_embedding``, ``class_embeddings_concat`` (concatenate instead of add) and
    ``time_embed_act`` applied to the result. Casts follow the UNet (to the model's dtype, which
    is the sample dtype in normal use). ``batch_size`` broadcasts a scalar timestep.
    """
    _check_supported(unet)
    cond = _is_condition_model(unet)
    device, dtype = unet.device, unet.dtype
    t = _as_timesteps(timesteps, batch_size, device, cond)
    t_emb = unet.time_proj(t).to(dtype=dtype)
    emb = unet.time_embedding(t_emb, timestep_cond) if cond else unet.time_embedding(t_emb)

    class_embedding = getattr(unet, "class_embedding", None)
    if class_embedding is not None:
        if class_labels is None:
            raise ValueError("class_labels should be provided when the UNet has a class embedding")
        if unet.config.class_embed_type == "timestep":
            class_labels = unet.time_proj(class_labels)
            if cond:
                class_labels = class_labels.to(dtype=dtype)
        class_emb = class_embedding(class_labels).to(dtype=dtype)
        if cond and unet.config.class_embeddings_concat:
            emb = torch.cat([emb, class_emb], dim=-1)
        else:
            emb = emb + class_emb
    elif class_labels is not None:
        raise ValueError("class_labels given but the UNet has no class embedding")

    act = getattr(unet, "time_embed_act", None) if cond else None
    if act is not None:
        emb = act(emb)
    return emb


def tib_features(
    unet: nn.Module,
    timesteps: torch.Tensor | float | int,
    class_labels: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """E_i(t) = resnet_i.time_emb_proj(resnet_i.nonlinearity(emb)) for every resnet, keyed by resnet name.

    Shape (B, C_i), or (B, 2 C_i) with ``resnet_time_scale_shift="scale_shift"``; this is the
    ``time_emb_proj`` output before the resnet's ``[:, :, None, None]``. It calls the modules
    themselves, so QuantLinear swaps (and their current rounding) are honoured. Resnets
    built with ``skip_time_act`` get ``time_emb_proj(emb)``.
    """
    emb = time_embedding_output(unet, timesteps, class_labels, timestep_cond, batch_size)
    out: dict[str, torch.Tensor] = {}
    for name, res in resnet_blocks(unet):
        if res.time_emb_proj is None:
            continue
        h = emb if res.skip_time_act else res.nonlinearity(emb)
        out[name] = res.time_emb_proj(h)
    return out


# -- 3. full-precision exceptions ----------------------------------------------------------------


def _layer_names(unet: nn.Module) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, LAYER_TYPES)]


def _ldm_style_attentions(unet: nn.Module) -> list[str]:
    """Attention modules that are not inside a BasicTransformerBlock (UNet2DModel's attention blocks)."""
    tb = _diffusers_classes()["BasicTransformerBlock"]
    inside = {id(a) for m in unet.modules() if isinstance(m, tb) for a in m.modules()}
    return [n for n, m in attention_modules(unet) if id(m) not in inside]


def fp_rules(
    unet: nn.Module,
    method: str,
    brecq_8bit_head_stem: bool = False,
    tfmq_attention_fp: bool = True,
) -> list[QuantRule]:
    """Each method's full-precision exceptions, as recipe rules with exact module names.

    * ``rtn``: none.
    * ``qdiff``: none: every Conv2d/Linear is quantized, shortcuts and the time MLP included (§4.1).
    * ``brecq``: none by default, like QD (§3.2). With ``brecq_8bit_head_stem`` BRECQ's
      first/last-layer rule: ``conv_in`` and ``conv_out`` at 8-bit weights and 8-bit activations.
    * ``tfmq`` (§5.1 in diffusers names):
      - not wrapped (``skip=True``): every Conv2d/Linear whose name contains 'shortcut' or 'skip'
        (``conv_shortcut``, ``skip_conv``), and every Downsample2D conv (LDM's ``op``);
      - ``disable_out_quantization``: ``time_embedding.linear_1`` weights+input FP (TFMQ wraps it
        but never reconstructs it: the engine must skip it in TIAR's f_reg), ``time_embedding.linear_2``
        input FP, ``conv_in`` weights+input FP, the first resnet's ``conv1`` input FP, ``conv_out``
        weights+input FP (conv_in/conv_out: not reconstructed either);
      - ``tfmq_attention_fp``: the q/k/v/out projections of stand-alone (LDM-style) Attention modules
        are not wrapped, as TFMQ left LDM's Conv1d qkv/proj_out FP. Transformer-block attentions
        (UNet2DConditionModel) stay quantized: they are nn.Linear in the original SD code too.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (use one of {list(METHODS)})")
    if method in ("rtn", "qdiff"):
        return []
    if method == "brecq":
        if not brecq_8bit_head_stem:
            return []
        return [QuantRule(n, weight_bits=8, act_bits=8) for n in ("conv_in", "conv_out")]

    from diffusers.models.downsampling import Downsample2D

    layers = _layer_names(unet)
    rules: list[QuantRule] = []
    for n in layers:
        leaf = n.rsplit(".", 1)[-1]
        if "shortcut" in leaf or "skip" in leaf:
            rules.append(QuantRule(n, skip=True))
    for name, mod in unet.named_modules():
        if isinstance(mod, Downsample2D):
            rules += [
                QuantRule(f"{name}.{c}", skip=True) for c, m in mod.named_children() if isinstance(m, LAYER_TYPES)
            ]
    if tfmq_attention_fp:
        for a in _ldm_style_attentions(unet):
            rules += [QuantRule(n, skip=True) for n in layers if n.startswith(a + ".")]
    first_res = resnet_blocks(unet)[0][0]
    rules += [
        QuantRule("time_embedding.linear_1", quantize_weight=False, quantize_input=False),
        QuantRule("time_embedding.linear_2", quantize_input=False),
        QuantRule("conv_in", quantize_weight=False, quantize_input=False),
        QuantRule(f"{first_res}.conv1", quantize_input=False),
        QuantRule("conv_out", quantize_weight=False, quantize_input=False),
    ]
    return rules


# -- 4. split shortcut ---------------------------------------------------------------------------


def _out_channels(block: nn.Module) -> int:
    return block.resnets[-1].out_channels


def split_points(unet: nn.Module) -> dict[str, int]:
    """``conv_shortcut`` name -> C_h for every up-block resnet fed the concatenation [h, skip] (§4.2).

    In diffusers up blocks (UpBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D, ...) resnet j gets
    ``torch.cat([h, res], 1)``; h has ``prev_output_channel`` channels for j = 0 (the output of
    the previous up block, or of the mid block / last down block for the first up block;
    attention and upsamplers keep the width) and ``out_channels`` (= resnet j-1's output) for
    j > 0. Resnets whose concatenation width equals their output width have no
    ``conv_shortcut`` (identity residual) and nothing to split. Only the shortcut is split;
    ``conv1`` sees GN+SiLU of the concatenation and is not (§4.2).
    """
    splits: dict[str, int] = {}
    if getattr(unet, "mid_block", None) is not None and hasattr(unet.mid_block, "resnets"):
        prev = _out_channels(unet.mid_block)
    else:
        prev = _out_channels(unet.down_blocks[-1])
    for b, block in enumerate(unet.up_blocks):
        if not hasattr(block, "resnets"):
            raise NotImplementedError(f"up block {type(block).__name__} has no resnets: unknown concatenation")
        for j, res in enumerate(block.resnets):
            c_h = prev if j == 0 else block.resnets[j - 1].out_channels
            c_s = res.in_channels - c_h
            if c_s <= 0:
                raise ValueError(f"up_blocks.{b}.resnets.{j}: in_channels {res.in_channels} <= C_h {c_h}")
            if res.conv_shortcut is not None:
                splits[f"up_blocks.{b}.resnets.{j}.conv_shortcut"] = c_h
        prev = _out_channels(block)
    return splits


# -- 6. summary ----------------------------------------------------------------------------------


def describe(unet: nn.Module) -> dict[str, Any]:
    """Counts for logs: units by kind and class, temporal layers, split layers, attention modules."""
    units = reconstruction_units(unet)
    by_class: dict[str, int] = {}
    for u in units:
        key = type(u.module).__name__ if u.kind == "block" else "layer"
        by_class[key] = by_class.get(key, 0) + 1
    attns = attention_modules(unet)
    return {
        "family": "unet2d_condition" if _is_condition_model(unet) else "unet2d",
        "units": {
            "block": sum(u.kind == "block" for u in units),
            "layer": sum(u.kind == "layer" for u in units),
        },
        "units_by_class": by_class,
        "resnets": len(resnet_blocks(unet)),
        "temporal_layers": len(temporal_layer_names(unet)),
        "split_layers": len(split_points(unet)),
        "attention_modules": len(attns),
        "ldm_style_attention_modules": len(_ldm_style_attentions(unet)),
        "attention_quantizers_installed": sum(isinstance(m.processor, QuantAttnProcessor) for _, m in attns),
    }

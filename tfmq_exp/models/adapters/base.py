"""The interface every architecture adapter implements, and what all diffusers UNets share.

An adapter answers, from module names and classes, what the quantization methods need to know about
one architecture family (docs/methods.md):

* ``reconstruction_units``: blocks and stand-alone layers for block/layer reconstruction (§1.4, §2);
* ``tib_modules`` / ``temporal_layer_names`` / ``time_embedding_output`` / ``tib_features``: the
  Temporal Information Block (§5.3);
* ``fp_rules``: each method's full-precision exceptions as ``QuantRule`` lists (§4.1, §5.1, §3.2);
* ``split_points``: Q-Diffusion's split-shortcut layers (§4.2);
* ``attention_modules`` / ``install_attention_quantizers``: the q/k/v/softmax quantizers (§4.1, §9 D2);
* ``example_inputs`` and ``describe``: a forward pass for tracing, counts for logs.

``UNetAdapter`` implements all of it for diffusers UNets; the family files (``unet2d.py``,
``unet2d_condition.py``) add what differs: how ``emb`` is built, which inputs a forward needs, and which
attentions TFMQ-DM keeps in full precision.

Unit order (§1.4, §9 T5). ``order="registration"`` walks ``named_children`` recursively in registration
order, as TFMQ and QD do. In diffusers that order differs from the forward order in two places, unlike
the LDM ``openaimodel`` UNet whose registration order is the forward order: the UNet registers
``mid_block`` after every up block, and ``Attn*Block2D`` / ``CrossAttn*Block2D`` / mid blocks register
``attentions`` before ``resnets`` while the forward pass runs resnet_i, then attention_i. ``order="forward"``
returns the same units sorted by the first call in a traced forward pass, which matches what the original
LDM code's registration order gives. With asym input caching the order decides which upstream units are
already hard-rounded when a unit is reconstructed.

Works on FP models and on models whose Conv2d/Linear layers are already swapped to
``QuantConv2d``/``QuantLinear`` (they are still ``nn.Conv2d``/``nn.Linear``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tfmq_exp.models.attention import QuantAttnProcessor, attention_modules, install_attention_quantizers
from tfmq_exp.quant.recipe import QuantRule

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


def diffusers_classes() -> dict[str, type[nn.Module]]:
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
    """The diffusers classes reconstructed as one block (``UNetAdapter.block_classes``)."""
    c = diffusers_classes()
    return (c["ResnetBlock2D"], c["ResnetBlockCondNorm2D"], c["Attention"], c["BasicTransformerBlock"])


def resnet_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every diffusers ``ResnetBlock2D``, in registration order."""
    cls = diffusers_classes()["ResnetBlock2D"]
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, cls)]


def layer_names(unet: nn.Module) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, LAYER_TYPES)]


def standalone_attentions(unet: nn.Module) -> list[str]:
    """Attention modules outside any BasicTransformerBlock (the LDM-style attention blocks of UNet2DModel)."""
    tb = diffusers_classes()["BasicTransformerBlock"]
    inside = {id(a) for m in unet.modules() if isinstance(m, tb) for a in m.modules()}
    return [n for n, m in attention_modules(unet) if id(m) not in inside]


class UNetAdapter:
    """What the methods need to know about one diffusers UNet; subclasses are the architecture families."""

    family: ClassVar[str] = ""
    unet_class: ClassVar[str] = ""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.check_supported()

    # -- what a family defines ----------------------------------------------------------------

    @classmethod
    def matches(cls, unet: nn.Module) -> bool:
        return type(unet).__name__ == cls.unet_class

    def check_supported(self) -> None:
        """Raise ``NotImplementedError`` for variants of the family the adapter does not describe."""

    def example_inputs(self, batch_size: int = 1) -> dict[str, Any]:
        raise NotImplementedError

    def time_embedding_output(self, timesteps: Any, class_labels: torch.Tensor | None = None,
                              timestep_cond: torch.Tensor | None = None,
                              batch_size: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def tfmq_fp_attentions(self) -> list[str]:
        """Attention modules whose q/k/v/out projections TFMQ-DM leaves unwrapped (``attention_fp``)."""
        raise NotImplementedError

    # -- 1. reconstruction units --------------------------------------------------------------

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """Classes reconstructed as one block (§2): resnets, stand-alone Attention, transformer blocks.

        A diffusers ``Attention`` outside a ``BasicTransformerBlock`` (the LDM-style ``AttentionBlock``)
        is always a block here, whatever the activation setting. The original LDM code splits it into
        layers + weightless matmul blocks when activation quantization is on (§2, §9 T6); this is not
        reproduced.
        """
        return block_classes()

    def tib_modules(self) -> dict[str, nn.Module]:
        """The modules that build ``emb``: ``time_proj``, ``time_embedding`` and ``class_embedding`` if any.

        They are not reconstruction units: TFMQ reconstructs the TIB (these linears plus every resnet's
        ``time_emb_proj``) separately (§5.4); Q-Diffusion reconstructs the ``time_embedding`` linears as
        single-layer units before the blocks (§2).
        """
        out = {}
        for name in TIB_CHILDREN:
            mod = getattr(self.unet, name, None)
            if isinstance(mod, nn.Module):
                out[name] = mod
        return out

    def reconstruction_units(self, order: str = "registration", example: dict[str, Any] | None = None) -> list[Unit]:
        """Blocks and stand-alone Conv2d/Linear layers, in ``order`` ("registration" or "forward").

        A unit never nests in another; blocks contain their layers (including a resnet's ``time_emb_proj``,
        which TFMQ leaves to the TIB, §5.5). The TIB-side modules are excluded. ``order="forward"`` runs one
        small forward pass (``example`` kwargs, default ``example_inputs()``); run it on the FP model, before
        activation quantizers exist, or pass inputs that work for the current state.
        """
        if order not in ("registration", "forward"):
            raise ValueError(f"unknown unit order '{order}' (use 'registration' or 'forward')")
        skip = {id(m) for m in self.tib_modules().values()}
        units: list[Unit] = []
        _walk_units(self.unet, "", self.block_classes(), skip, set(), units)
        if order == "forward":
            units = self._forward_sorted(units, example)
        return units

    @torch.no_grad()
    def _forward_sorted(self, units: list[Unit], example: dict[str, Any] | None) -> list[Unit]:
        first_call: dict[int, int] = {}
        handles = []
        for i, unit in enumerate(units):

            def hook(_mod, _args, i=i):
                first_call.setdefault(i, len(first_call))

            handles.append(unit.module.register_forward_pre_hook(hook))
        try:
            self.unet(**(example if example is not None else self.example_inputs()))
        finally:
            for h in handles:
                h.remove()
        # Units never called keep their registration position, after the called ones.
        return [units[i] for i in sorted(range(len(units)), key=lambda i: (i not in first_call, first_call.get(i, i)))]

    # -- 2. temporal information block -------------------------------------------------------

    def temporal_layer_names(self) -> list[str]:
        """The TIB's Linear layers (§5.3): time-embedding MLP, class-embedding linears, every ``time_emb_proj``.

        Order: ``time_embedding.*`` linears, then the class embedding's linears where it has any, then each
        resnet's ``time_emb_proj`` in registration order. An ``nn.Embedding`` or ``nn.Identity`` class
        embedding has no Linear: it is neither listed nor quantized (the swap only wraps Conv2d/Linear).
        Text or class contexts that enter through cross-attention are not part of the TIB (§5.3).
        """
        names: list[str] = []
        for prefix, mod in self.tib_modules().items():
            if isinstance(mod, nn.Linear):
                names.append(prefix)
                continue
            names += [f"{prefix}.{n}" for n, m in mod.named_modules() if n and isinstance(m, nn.Linear)]
        for name, res in resnet_blocks(self.unet):
            if res.time_emb_proj is not None:
                names.append(f"{name}.time_emb_proj")
        return names

    def tib_features(self, timesteps: Any, class_labels: torch.Tensor | None = None,
                     timestep_cond: torch.Tensor | None = None,
                     batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """E_i(t) = resnet_i.time_emb_proj(resnet_i.nonlinearity(emb)) for every resnet, keyed by resnet name.

        Shape (B, C_i), or (B, 2 C_i) with ``resnet_time_scale_shift="scale_shift"``: the ``time_emb_proj``
        output before the resnet's ``[:, :, None, None]``. It calls the modules themselves, so QuantLinear
        swaps (and their current rounding) are honoured. Resnets built with ``skip_time_act`` get
        ``time_emb_proj(emb)``.
        """
        emb = self.time_embedding_output(timesteps, class_labels, timestep_cond, batch_size)
        out: dict[str, torch.Tensor] = {}
        for name, res in resnet_blocks(self.unet):
            if res.time_emb_proj is None:
                continue
            h = emb if res.skip_time_act else res.nonlinearity(emb)
            out[name] = res.time_emb_proj(h)
        return out

    # -- 3. full-precision exceptions ---------------------------------------------------------

    def fp_rules(self, method: str, brecq_8bit_head_stem: bool = False,
                 tfmq_attention_fp: bool = True) -> list[QuantRule]:
        """Each method's full-precision exceptions, as recipe rules with exact module names.

        * ``rtn``, ``qdiff``: none: every Conv2d/Linear is quantized, shortcuts and the time MLP included (§4.1).
        * ``brecq``: none by default (§3.2). With ``brecq_8bit_head_stem``: ``conv_in`` and ``conv_out`` at
          8-bit weights and activations.
        * ``tfmq`` (§5.1 in diffusers names): shortcut/skip convs and Downsample2D convs not wrapped;
          ``time_embedding.linear_1`` weights+input FP (wrapped, never reconstructed), ``linear_2`` input FP,
          ``conv_in`` and ``conv_out`` weights+input FP, the first resnet's ``conv1`` input FP; with
          ``tfmq_attention_fp`` the projections of ``tfmq_fp_attentions()`` are not wrapped.
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

        layers = layer_names(self.unet)
        rules: list[QuantRule] = []
        for n in layers:
            leaf = n.rsplit(".", 1)[-1]
            if "shortcut" in leaf or "skip" in leaf:
                rules.append(QuantRule(n, skip=True))
        for name, mod in self.unet.named_modules():
            if isinstance(mod, Downsample2D):
                rules += [QuantRule(f"{name}.{c}", skip=True) for c, m in mod.named_children()
                          if isinstance(m, LAYER_TYPES)]
        if tfmq_attention_fp:
            for a in self.tfmq_fp_attentions():
                rules += [QuantRule(n, skip=True) for n in layers if n.startswith(a + ".")]
        first_res = resnet_blocks(self.unet)[0][0]
        rules += [
            QuantRule("time_embedding.linear_1", quantize_weight=False, quantize_input=False),
            QuantRule("time_embedding.linear_2", quantize_input=False),
            QuantRule("conv_in", quantize_weight=False, quantize_input=False),
            QuantRule(f"{first_res}.conv1", quantize_input=False),
            QuantRule("conv_out", quantize_weight=False, quantize_input=False),
        ]
        return rules

    # -- 4. split shortcut --------------------------------------------------------------------

    def split_points(self) -> dict[str, int]:
        """``conv_shortcut`` name -> C_h for every up-block resnet fed the concatenation [h, skip] (§4.2).

        In diffusers up blocks resnet j gets ``torch.cat([h, res], 1)``; h has ``prev_output_channel``
        channels for j = 0 (the previous up block's output, or the mid block's / last down block's for the
        first up block) and resnet j-1's output width for j > 0. Resnets without ``conv_shortcut`` have an
        identity residual and nothing to split. Only the shortcut is split; ``conv1`` sees GN+SiLU of the
        concatenation and is not (§4.2).
        """
        unet = self.unet
        splits: dict[str, int] = {}
        if getattr(unet, "mid_block", None) is not None and hasattr(unet.mid_block, "resnets"):
            prev = unet.mid_block.resnets[-1].out_channels
        else:
            prev = unet.down_blocks[-1].resnets[-1].out_channels
        for b, block in enumerate(unet.up_blocks):
            if not hasattr(block, "resnets"):
                raise NotImplementedError(f"up block {type(block).__name__} has no resnets: unknown concatenation")
            for j, res in enumerate(block.resnets):
                c_h = prev if j == 0 else block.resnets[j - 1].out_channels
                if res.in_channels - c_h <= 0:
                    raise ValueError(f"up_blocks.{b}.resnets.{j}: in_channels {res.in_channels} <= C_h {c_h}")
                if res.conv_shortcut is not None:
                    splits[f"up_blocks.{b}.resnets.{j}.conv_shortcut"] = c_h
            prev = block.resnets[-1].out_channels
        return splits

    # -- 5. attention quantizers --------------------------------------------------------------

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        return attention_modules(self.unet)

    def install_attention_quantizers(self, act_bits: int, softmax_bits: int, enabled: bool, **kw: Any) -> list[str]:
        """Q-Diffusion's q/k/v/softmax quantizers on every attention (self- and cross-attention alike)."""
        return install_attention_quantizers(self.unet, act_bits, softmax_bits, enabled, **kw)

    # -- 6. summary ---------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Counts for logs: units by kind and class, temporal layers, split layers, attention modules."""
        units = self.reconstruction_units()
        by_class: dict[str, int] = {}
        for u in units:
            key = type(u.module).__name__ if u.kind == "block" else "layer"
            by_class[key] = by_class.get(key, 0) + 1
        attns = self.attention_modules()
        return {
            "family": self.family,
            "units": {"block": sum(u.kind == "block" for u in units), "layer": sum(u.kind == "layer" for u in units)},
            "units_by_class": by_class,
            "resnets": len(resnet_blocks(self.unet)),
            "temporal_layers": len(self.temporal_layer_names()),
            "split_layers": len(self.split_points()),
            "attention_modules": len(attns),
            "ldm_style_attention_modules": len(standalone_attentions(self.unet)),
            "attention_quantizers_installed": sum(isinstance(m.processor, QuantAttnProcessor) for _, m in attns),
        }


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


def as_timesteps(timesteps: Any, batch_size: int | None, device: torch.device, cond: bool) -> torch.Tensor:
    """Timesteps as the UNet's forward turns them into a (B,) tensor (the two families differ slightly)."""
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


def class_embedding_input_width(mod: nn.Module) -> int:
    for m in mod.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError("cannot infer the class-embedding input width: pass example inputs")


def example_class_labels(unet: nn.Module, batch_size: int, param: torch.Tensor) -> torch.Tensor | None:
    cfg, cls_emb = unet.config, getattr(unet, "class_embedding", None)
    if isinstance(cls_emb, nn.Embedding) or getattr(cfg, "class_embed_type", None) == "timestep":
        return torch.zeros(batch_size, dtype=torch.long, device=param.device)
    if cls_emb is not None:
        in_dim = getattr(cfg, "projection_class_embeddings_input_dim", None) or class_embedding_input_width(cls_emb)
        return torch.zeros(batch_size, in_dim, device=param.device, dtype=param.dtype)
    return None


def example_sample(unet: nn.Module, batch_size: int) -> dict[str, Any]:
    cfg = unet.config
    size = 2 ** (len(cfg.block_out_channels) + 1)
    param = next(unet.parameters())
    kw: dict[str, Any] = {
        "sample": torch.randn(batch_size, cfg.in_channels, size, size, device=param.device, dtype=param.dtype),
        "timestep": torch.full((batch_size,), 10, dtype=torch.long, device=param.device),
    }
    labels = example_class_labels(unet, batch_size, param)
    if labels is not None:
        kw["class_labels"] = labels
    return kw

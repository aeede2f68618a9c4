"""Attention matmul quantizers for diffusers ``Attention`` modules (docs/methods.md §4.1, §9 D2).

``QuantAttnProcessor`` is a diffusers attention processor (the call signature of diffusers 0.42
``AttnProcessor``/``AttnProcessor2_0``) that is also an ``nn.Module``. It owns four
``UniformQuantizer``s:

* ``q_quantizer``, ``k_quantizer``: the query and key after the head split, before Q K^T
  (the ``attn.scale`` factor is applied inside the product, so a per-tensor grid on q is the
  same grid as on q * scale up to the factor; QD's LDM path quantizes q * scale);
* ``v_quantizer``: the value after the head split;
* ``softmax_quantizer``: the attention probabilities, ``always_zero=True``, with its own
  bit-width (QD: 8 for LDM, 16 for SD).

``attn.set_processor(proc)`` assigns ``attn.processor = proc``; ``nn.Module.__setattr__``
registers it as the child module ``processor``, so the quantizers appear in
``named_modules()`` as ``<attn>.processor.q_quantizer`` etc. and their buffers are saved in
``unet.state_dict()``. A model loaded from such a state dict must have the processors
installed first (``install_attention_quantizers``), otherwise the keys are unexpected.

With every quantizer disabled the processor computes exactly what ``AttnProcessor`` computes
(explicit softmax(QK^T * scale) V); it matches ``AttnProcessor2_0`` (SDPA) to float rounding.
Unlike ``AttnProcessor2_0`` it honours ``attn.scale`` (SDPA uses 1/sqrt(head_dim), which is
the same number unless the Attention was built with ``scale_qk=False`` or a custom scale).
"""

from __future__ import annotations

import torch
from torch import nn

from tfmq_exp.quant.quantizer import UniformQuantizer

QUANTIZER_NAMES = ("q_quantizer", "k_quantizer", "v_quantizer", "softmax_quantizer")


def _attention_class() -> type[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return Attention


class QuantAttnProcessor(nn.Module):
    """Diffusers attention processor with fake-quant q, k, v and softmax-probability quantizers."""

    def __init__(
        self, act_bits: int = 8, softmax_bits: int = 8, enabled: bool = False, init: str = "lp",
        symmetric: bool = False, softmax_always_zero: bool = True, ema: str = "zero_forced",
    ) -> None:
        super().__init__()
        kw = {"per_channel": False, "init": init, "enabled": enabled, "ema": ema}
        self.q_quantizer = UniformQuantizer(act_bits, symmetric=symmetric, **kw)
        self.k_quantizer = UniformQuantizer(act_bits, symmetric=symmetric, **kw)
        self.v_quantizer = UniformQuantizer(act_bits, symmetric=symmetric, **kw)
        # LDM/SD: probabilities on [0, 2^b - 1] with z = 0; QD's DDIM AttnBlock: an ordinary activation
        # quantizer that follows a_sym (§9 Q4: half its grid is spent on negative values)
        self.softmax_quantizer = UniformQuantizer(
            softmax_bits, always_zero=softmax_always_zero, symmetric=symmetric and not softmax_always_zero, **kw
        )

    def quantizers(self) -> list[UniformQuantizer]:
        return [getattr(self, n) for n in QUANTIZER_NAMES]

    # diffusers' Attention.forward inspects ``processor.__call__``'s signature to decide which
    # keyword arguments to pass (e.g. UNetMidBlock2D passes ``temb``); nn.Module.__call__ is
    # (*args, **kwargs), so spell the signature out here and go through nn.Module.__call__ (hooks).
    def __call__(  # noqa: D102
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        # (B, N, h*d) -> (B*h, N, d)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        query = self.q_quantizer(query)
        key = self.k_quantizer(key)
        value = self.v_quantizer(value)

        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            scores = torch.bmm(query, key.transpose(-1, -2)) * attn.scale
        else:
            scores = torch.baddbmm(attention_mask, query, key.transpose(-1, -2), beta=1, alpha=attn.scale)
        if attn.upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(dtype)
        probs = self.softmax_quantizer(probs)

        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def extra_repr(self) -> str:
        return f"act_bits={self.q_quantizer.n_bits}, softmax_bits={self.softmax_quantizer.n_bits}"


def attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every diffusers ``Attention`` in registration order."""
    attn_cls = _attention_class()
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, attn_cls)]


def install_attention_quantizers(
    unet: nn.Module, act_bits: int, softmax_bits: int, enabled: bool, init: str = "lp", symmetric: bool = False,
    softmax_always_zero: bool = True, ema: str = "zero_forced",
) -> list[str]:
    """Give every ``Attention`` a fresh ``QuantAttnProcessor``; returns the Attention module names.

    ``enabled=False`` reproduces TFMQ's released code (§9 D2: attention matmuls stay FP);
    ``enabled=True`` is Q-Diffusion's ``--quant_act`` (softmax 8 bits for LDM, 16 for SD).
    The activation quantizers still need calibration (``observing``) before use when enabled;
    ``tfmq_exp.quant.swap.calibrate_activations`` does not see them: use ``attention_quantizers``.
    """
    names = []
    for name, attn in attention_modules(unet):
        attn.set_processor(
            QuantAttnProcessor(act_bits, softmax_bits, enabled, init, symmetric, softmax_always_zero, ema)
        )
        if attn._modules.get("processor") is not attn.processor:  # pragma: no cover - diffusers contract
            raise RuntimeError(f"diffusers did not register the processor of {name} as a child module")
        names.append(name)
    return names


def attention_quantizers(unet: nn.Module) -> dict[str, UniformQuantizer]:
    """Full name -> quantizer, for every installed ``QuantAttnProcessor``."""
    out: dict[str, UniformQuantizer] = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, QuantAttnProcessor):
            for qn in QUANTIZER_NAMES:
                out[f"{name}.{qn}"] = getattr(mod, qn)
    return out


def set_attention_quant_state(unet: nn.Module, enabled: bool) -> None:
    """Switch every attention matmul quantizer on or off."""
    for q in attention_quantizers(unet).values():
        q.enabled = enabled


def attention_settings(unet: nn.Module) -> dict | None:
    """What ``install_attention_quantizers`` needs to rebuild the installed quantizers (for checkpoints)."""
    procs = [m for m in unet.modules() if isinstance(m, QuantAttnProcessor)]
    if not procs:
        return None
    q, sm = procs[0].q_quantizer, procs[0].softmax_quantizer
    return {"act_bits": q.n_bits, "softmax_bits": sm.n_bits, "enabled": q.enabled, "init": q.init,
            "symmetric": q.symmetric, "softmax_always_zero": sm.always_zero, "ema": q.ema}


def reinstall_attention_quantizers(unet: nn.Module, settings: dict) -> None:
    """Install the quantizers a checkpoint's ``attention_settings`` describe, disabled until loaded."""
    kw = {k: settings[k] for k in ("init", "symmetric", "softmax_always_zero", "ema") if k in settings}
    install_attention_quantizers(unet, settings["act_bits"], settings["softmax_bits"], False, **kw)

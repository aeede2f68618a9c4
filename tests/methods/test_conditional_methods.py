"""Conditional models through the methods: the c/uc pool layout, contexts reaching the units, FSC over both
halves of the guided batch, and a bit-identical checkpoint reload for tfmq, qdiff and brecq."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf

from tfmq_exp.diffusion.calib_pool import CalibRecord, call_model
from tfmq_exp.methods import MethodContext, get_method
from tfmq_exp.models.attention import attention_settings, reinstall_attention_quantizers, set_attention_quant_state
from tfmq_exp.quant.state import load_quantized, save_quantized
from tfmq_exp.quant.steps import step_context

torch.set_num_threads(1)
N, S, L, D = 6, 3, 2, 8


def tiny_cond() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, norm_num_groups=4, attention_head_dim=2,
    ).eval().requires_grad_(False)


def record() -> CalibRecord:
    g = torch.Generator().manual_seed(3)
    contexts = torch.cat([torch.randn(N, L, D, generator=g), torch.zeros(1, L, D)])  # last row: null context
    return CalibRecord(xs=torch.randn(S, N, 4, 8, 8, generator=g), ts=torch.tensor([900, 500, 100]),
                       contexts=contexts, guided=True)


def test_guided_pool_layout_is_c_uc_per_trajectory():
    rec = record()
    pool = rec.pool(steps=[1])
    assert len(pool) == 2 * N  # every x_t with c and with uc, as the official generators store them
    assert pool.ctx_idx.tolist() == [0, N, 1, N, 2, N, 3, N, 4, N, 5, N]
    assert torch.equal(pool.x[0], pool.x[1]) and torch.equal(pool.x[0], rec.xs[1, 0])
    b = pool.batch(slice(0, 4))
    assert torch.equal(b.ctx[1], torch.zeros(L, D)) and torch.equal(b.ctx[2], rec.contexts[1])
    assert len(rec.pool(steps=[0], per_step=4)) == 4  # a prefix keeps both halves of each trajectory


def run(name: str, options: dict | None = None):
    quantizer = OmegaConf.create({
        "name": name, "weight": {"n_bits": 4, "per_channel": True, "init": "lp", "p": 2.4, "symmetric": False},
        "act": {"n_bits": 8, "per_channel": False, "init": "lp", "p": 2.4, "symmetric": False, "ema": "raw"},
        "act_calib_samples": 8, "rules": [],
        "options": {"calib_steps": 3, "fsc_per_step": 2 * N, "softmax_bits": 8, **(options or {})},
    })
    ctx = MethodContext(
        fp_unet=tiny_cond(), record=record(), quantizer=quantizer, calib=OmegaConf.create({"batch_size": 8}),
        recon=OmegaConf.create({"iters": 3, "batch_size": 4, "pool_size": 12, "act_iters": 2, "act_lr": 4e-4,
                                "weight_lr": 1e-3, "reg_weight": 0.01, "warmup": 0.2, "beta_start": 20.0,
                                "beta_end": 2.0, "cache_on": "device"}),
        trainer=OmegaConf.create({"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true",
                                  "num_nodes": 1}),
        seed=0, origin="sd",
    )
    return ctx, get_method(name)(ctx)


@pytest.mark.parametrize(("name", "options"), [("tfmq", {"quant_attention": True}), ("qdiff", {}), ("brecq", {})])
def test_conditional_model_quantizes_and_reloads_bit_for_bit(tmp_path, name, options):
    ctx, res = run(name, options)
    units = [u["unit"] for u in res.info["units"]]
    assert any("attentions" in u and "transformer_blocks" in u for u in units)  # transformer blocks reconstructed
    assert all(torch.isfinite(torch.tensor([u["loss_after"] for u in res.info["units"]])))
    pool = ctx.record.pool(steps=[2])
    batch = pool.batch(slice(0, 4))
    attn = attention_settings(res.model)
    path = save_quantized(res.model, res.recipe, tmp_path / "q.safetensors", {"attention": attn})
    fresh = tiny_cond()
    if attn:
        reinstall_attention_quantizers(fresh, attn)
    load_quantized(fresh, path)
    if attn:
        set_attention_quant_state(fresh, attn["enabled"])
    with step_context(2):
        a = call_model(res.model, batch).sample
        b = call_model(fresh, batch).sample
        fp = call_model(ctx.fp_unet, batch).sample
    assert torch.equal(a, b)
    assert not torch.equal(a, fp)
    # the context matters to the quantized model too: another context, another output
    other = batch._replace(ctx=torch.flip(batch.ctx, [0]))
    with step_context(2):
        assert not torch.allclose(call_model(res.model, other).sample, a)


def test_fsc_tables_see_both_halves_of_the_guided_batch():
    """Each step's table is an EMA over all 2N entries of that step: with the null context made extreme,
    the cross-attention key/value inputs' ranges follow it, and without the uc half they would not."""
    ctx, res = run("tfmq", {"quant_attention": False, "fsc_batch_size": 2 * N})
    mods = dict(res.model.named_modules())
    to_k = next(m for n, m in mods.items() if n.endswith("attn2.to_k"))
    contexts = ctx.record.contexts
    table = to_k.input_quantizer.step_scale
    hi = contexts.max().clamp(min=0)  # the EMA over one batch holding every entry: M = 0.95 M0 + 0.05 max
    assert table.shape == (S,)
    assert torch.all(table <= (hi - contexts.min().clamp(max=0)) / 255 + 1e-6)
    # the null context (zeros) is inside every step's range: the uc half was seen
    assert torch.all(to_k.input_quantizer.step_zero_point > 0)

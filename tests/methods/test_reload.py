"""Checkpoint reload through task=sample's own path is bit-identical to the model the method returned.

Q-Diffusion (split shortcut and attention-matmul quantizers on) and TFMQ-DM with ``quant_attention=true``
(per-step tables on every activation quantizer, the attention ones included) on a tiny UNet2DModel given
to the app as an embedded model: written by task=quantize's ``save_checkpoint``, read back by task=sample's
``load_checkpoint_model``, compared under ``step_context`` at every calibrated step.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DModel
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from safetensors.torch import save_file

from tfmq_exp.config import register_configs
from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods import MethodContext, get_method
from tfmq_exp.models import adapters
from tfmq_exp.models.loader import load_model
from tfmq_exp.quant.modules import quant_modules
from tfmq_exp.quant.steps import step_context
from tfmq_exp.tasks.quantize import save_checkpoint
from tfmq_exp.tasks.sample import load_checkpoint_model

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[2] / "conf"
TS = [900, 600, 300, 50]
ARCH = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1, "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4, "attention_head_dim": 4,
}


def quantize_and_reload(tmp_path: Path, *overrides: str):
    """Run a method on the tiny model as the app would, save its checkpoint, load it as task=sample does."""
    torch.manual_seed(0)
    weights = tmp_path / "tiny_unet.safetensors"
    save_file(UNet2DModel(**ARCH).state_dict(), str(weights))
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["bits=w4a8", "recon=smoke", *overrides])
    with open_dict(cfg):
        cfg.model.arch = ARCH
        cfg.model.weights = str(weights)
        cfg.model.image_size = 8
    model = load_model(cfg.model)
    torch.manual_seed(1)
    rec = CalibRecord(xs=torch.randn(4, 16, 1, 8, 8) * torch.tensor([1.0, 0.8, 0.5, 0.3]).view(-1, 1, 1, 1, 1),
                      ts=torch.tensor(TS))
    ctx = MethodContext(fp_unet=model.unet, record=rec, quantizer=cfg.quantizer, calib=cfg.calib, recon=cfg.recon,
                        trainer=cfg.trainer, seed=0, family="unet2d", origin="ddim")
    res = get_method(cfg.quantizer.name)(ctx)
    sampler = SimpleNamespace(describe=lambda: {"kind": "ddim", "steps": 4}, timesteps=TS)
    ckpt = save_checkpoint(cfg, res, "W4A8", sampler, tmp_path)
    loaded, meta = load_checkpoint_model(cfg, ckpt)
    return res.model.eval(), loaded.unet.eval(), rec, meta


def _outputs_match_at_every_step(original, reloaded, rec) -> None:
    for s, t in enumerate(TS):
        x = rec.xs[s, :3]
        with torch.no_grad(), step_context(s):
            a = original(x, torch.full((3,), t)).sample
            b = reloaded(x, torch.full((3,), t)).sample
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), (s, (a - b).abs().max())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each method quantized and reloaded once for the module."""
    cache = {}

    def get(quantizer: str):
        if quantizer not in cache:
            extra = ["quantizer.options.quant_attention=true"] if quantizer == "tfmq" else []
            cache[quantizer] = quantize_and_reload(tmp_path_factory.mktemp(quantizer), f"quantizer={quantizer}", *extra)
        return cache[quantizer]

    return get


@pytest.mark.parametrize("quantizer", ["qdiff", "tfmq"])
def test_reload_is_bit_identical(runs, quantizer):
    original, reloaded, rec, meta = runs(quantizer)

    attn = adapters.attention_quantizers(reloaded)
    assert meta["attention"]["enabled"] is True and len(attn) == 16  # 4 attentions x (q, k, v, softmax)
    assert all(q.enabled and (q.initialized or q.has_step_tables) for q in attn.values())
    if quantizer == "qdiff":
        splits = {n: m.split for n, m in quant_modules(reloaded) if m.split}
        assert splits == adapters.split_points(reloaded) and len(splits) == 4
        assert not any(q.has_step_tables for q in attn.values())
    else:  # scope 'all': every activation quantizer, the attention ones included, has a table per step
        assert all(q.step_scale.shape == (4,) for q in attn.values())
        assert not any(m.split for _, m in quant_modules(reloaded))
    _outputs_match_at_every_step(original, reloaded, rec)


def test_a_reload_without_the_attention_quantizers_would_differ(runs):
    """The comparison can fail: the same checkpoint with its attention matmuls left FP gives other outputs."""
    original, reloaded, rec, _ = runs("qdiff")
    adapters.set_attention_quant_state(reloaded, False)
    x = rec.xs[0, :3]
    try:
        with torch.no_grad():
            assert not torch.equal(original(x, torch.full((3,), TS[0])).sample,
                                   reloaded(x, torch.full((3,), TS[0])).sample)
    finally:
        adapters.set_attention_quant_state(reloaded, True)

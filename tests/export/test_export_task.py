"""task=export and task=sample backend=openvino on the embedded model, through the app."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from export_models import N_STEPS

from tfmq_exp.app import run
from tfmq_exp.errors import UserError
from tfmq_exp.models.loader import load_model
from tfmq_exp.quant import QuantizerSpec, QuantRecipe, quantize
from tfmq_exp.quant.quantizer import UniformQuantizer
from tfmq_exp.quant.state import save_quantized
from tfmq_exp.tasks.common import build_sampler

STEPS = [f"sampler.steps={N_STEPS}", "sampler.batch_size=4", "n_compare=4", "n_grid=4"]


def make_ckpt(make_cfg, path):
    cfg = make_cfg(*STEPS)
    model = load_model(cfg.model)
    sampler = build_sampler(cfg, model)
    recipe = QuantRecipe(weight=QuantizerSpec(n_bits=8, per_channel=True, init="minmax"),
                         act=QuantizerSpec(n_bits=8, init="minmax"))
    gen = torch.Generator().manual_seed(0)
    quantize(model.unet, recipe, lambda m: m(torch.randn(8, 1, 28, 28, generator=gen), torch.full((8,), 500)))
    for q in model.unet.modules():  # tables that move scale and zero point per step, as FSC's do
        if isinstance(q, UniformQuantizer) and q.enabled and not q.per_channel:
            i = torch.arange(N_STEPS, dtype=torch.float32)
            scale = q.scale.reshape(()) * (1.3 - 0.15 * i)
            q.set_step_tables(scale, torch.clamp(torch.round(q.zero_point.reshape(()) + i - 1), 0, 255))
    meta = {"model": "mnist", "quantizer": "rtn", "bits": "w8a8", "sampler": sampler.describe(),
            "timesteps": sampler.timesteps}
    return save_quantized(model.unet, recipe, path, meta)


def test_export_then_sample_with_the_runtime(make_cfg, tmp_path):
    ckpt = make_ckpt(make_cfg, tmp_path / "quantized.safetensors")
    exp_dir = tmp_path / "export"
    exp_dir.mkdir()
    cfg = make_cfg("task=export", f"ckpt={ckpt}", "export.threads=1", "export.step_tables=runtime", *STEPS)
    cfg.paths.output_dir = str(exp_dir)
    res = run(cfg)
    assert res["quantized_layers"] > 30 and res["quantized_layers_not_int8"] == []  # all of them on integers
    assert res["size"]["packed_bytes"] < res["size"]["fp32_bytes"] / 3
    assert all(d["rel_l2"] < 0.02 for d in res["unet_vs_fake_quant"].values())
    assert json.loads((exp_dir / "export.json").read_text())["step_tables"] == "runtime"

    images = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / backend
        out.mkdir()
        cfg = make_cfg("task=sample", f"ckpt={ckpt}", f"backend={backend}", f"export.dir={exp_dir}",
                       "export.threads=1", *STEPS)
        cfg.paths.output_dir = str(out)
        assert run(cfg)["backend"] == backend
        images[backend] = np.load(out / "samples.npz")["arr_0"].astype(np.int16)
    # the same digits: code flips at rounding boundaries (see test_openvino_export) move pixels by a few
    # levels on this roughly calibrated model (measured: PSNR about 40 dB; 53 dB on a TFMQ checkpoint)
    mse = ((images["torch"] - images["openvino"]) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 30


def test_export_without_the_runtime_says_what_to_install(make_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(UserError, match=r"^the OpenVINO runtime is not installed .*Fix: pip install -e"):
        run(make_cfg("task=export"))


def test_sampling_another_schedule_than_the_export_is_refused(make_cfg, tmp_path):
    (tmp_path / "export.json").write_text(json.dumps({"model": "mnist", "step_tables": "runtime",
                                                      "timesteps": [999, 500], "models": []}))
    cfg = make_cfg("task=sample", "backend=openvino", f"export.dir={tmp_path}", *STEPS)
    with pytest.raises(UserError, match=r"per-step tables for a 2-step schedule.*Fix: sample with sampler.steps=2"):
        run(cfg)

"""Per-unit resume inside the methods: a run stopped after some units, continued from its UnitCheckpoint,
ends with the uninterrupted run's model bit for bit (tfmq with TIAR, and qdiff)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_unets import tiny_unet

import tfmq_exp.methods.pipeline as pipeline
from tfmq_exp.config import register_configs
from tfmq_exp.diffusion.calib_data import CalibRecord
from tfmq_exp.methods import MethodContext, get_method
from tfmq_exp.recon.resume import UnitCheckpoint

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[2] / "conf"


def run(method, checkpoint=None):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"quantizer={method}", "bits=w4a8", "recon=smoke"])
    torch.manual_seed(1)
    rec = CalibRecord(xs=torch.randn(4, 16, 1, 8, 8), ts=torch.tensor([900, 600, 300, 50]))
    ctx = MethodContext(fp_unet=tiny_unet(), record=rec, quantizer=cfg.quantizer, calib=cfg.calib, recon=cfg.recon,
                        trainer=cfg.trainer, seed=0, checkpoint=checkpoint)
    return get_method(method)(ctx)


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["tfmq", "qdiff"])
def test_continued_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, method):
    ref = run(method)
    real = pipeline.optimize_rounding
    calls = []

    def dies_at_the_fourth_unit(*args, **kwargs):
        if len(calls) == 3:
            raise Killed
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "optimize_rounding", dies_at_the_fourth_unit)
    with pytest.raises(Killed):
        run(method, UnitCheckpoint(tmp_path))
    monkeypatch.setattr(pipeline, "optimize_rounding", real)
    ckpt = UnitCheckpoint(tmp_path)
    assert len(ckpt.done) == 3
    resumed = run(method, ckpt)
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [u["unit"] for u in resumed.info["units"]] == [u["unit"] for u in ref.info["units"]]

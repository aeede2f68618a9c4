"""The whole pipeline on the embedded model, in-process, with debug=smoke."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tfmq_exp.app import run

SMOKE = ("debug=smoke", "evaluator=none")


def _run(make_cfg, *overrides):
    cfg = make_cfg(*SMOKE, *overrides)
    res = run(cfg)
    return cfg, res


def test_fp_run_end_to_end(make_cfg, tmp_path):
    _, res = _run(make_cfg, "quantizer=fp")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["quantizer"] == "fp" and saved["bits"] == "fp"
    assert saved["metrics"]["fp_mse"] == 0.0  # FP against itself, same noise
    assert (tmp_path / "samples.png").is_file()
    assert not (tmp_path / "quantized.safetensors").exists()
    assert set(saved["timings"]) >= {"quantization_s", "sampling_s", "evaluation_s"}
    assert res["objective"] == 0.0


def test_rtn_run_end_to_end_and_deterministic(make_cfg, tmp_path):
    _, res = _run(make_cfg, "quantizer=rtn", "bits=w4a8")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["bits"] == "w4a8" and saved["quantizer"] == "rtn"
    assert set(saved["timings"]) >= {"calib_data_s", "quantization_s", "weight_stage_s", "act_stage_s", "sampling_s"}
    assert 0 < saved["metrics"]["fp_mse"] < 0.1 and saved["metrics"]["fp_psnr"] > 10
    assert len(saved["config_signature"]) == 16
    first = load_file(str(tmp_path / "quantized.safetensors"))
    imgs = np.load(tmp_path / "samples.npz")["arr_0"]
    assert imgs.dtype == np.uint8 and imgs.shape[1:] == (28, 28, 1)
    # same seed, second run (calibration record now from the cache): the same quantized model
    _, res2 = _run(make_cfg, "quantizer=rtn", "bits=w4a8")
    assert res2["calib_cache_hit"] is True
    second = load_file(str(tmp_path / "quantized.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert np.array_equal(imgs, np.load(tmp_path / "samples.npz")["arr_0"])


def test_sample_task_reloads_checkpoint_bit_for_bit(make_cfg, tmp_path):
    _run(make_cfg, "quantizer=rtn", "bits=w8a8")
    quant_imgs = np.load(tmp_path / "samples.npz")["arr_0"].copy()
    ckpt = tmp_path / "quantized.safetensors"
    moved = tmp_path / "q.safetensors"
    ckpt.rename(moved)
    _run(make_cfg, "task=sample", f"ckpt={moved}")
    assert np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], quant_imgs)


def test_weight_only_bits_leave_activations_fp(make_cfg, tmp_path):
    _, res = _run(make_cfg, "quantizer=rtn", "bits=w8a32")
    assert res["bits"] == "w8a32"
    state = load_file(str(tmp_path / "quantized.safetensors"))
    assert not any(k.endswith("input_quantizer.scale") and v.numel() for k, v in state.items())


@pytest.mark.parametrize("task", ["train"])
def test_train_task_runs_a_few_steps(make_cfg, tmp_path, task):
    res = run(make_cfg(f"task={task}", "model.train.steps=2", "model.train.batch_size=4", "model.train.warmup=1"))
    assert res["steps"] == 2 and (tmp_path / "mnist_unet.safetensors").is_file()


@pytest.mark.parametrize("method", ["brecq", "qdiff", "tfmq"])
def test_reconstruction_methods_end_to_end(make_cfg, tmp_path, method):
    _, res = _run(make_cfg, f"quantizer={method}", "bits=w4a8")
    info = res["method_info"]
    assert res["bits"] == "w4a8" and info["units"]
    weight_units = [u for u in info["units"] if u["stage"] == "weight"]
    assert all(u["wall_s"] >= 0 and u["iters"] == 10 for u in weight_units)
    if method == "tfmq":
        assert info["units"][0]["unit"] == "temporal_information_block"
        assert info["fsc_steps"] == 10 and info["fsc_scope"] == "all"
        assert not any(u["stage"] == "act" for u in info["units"])  # no LSQ in TFMQ
    else:
        assert any(u["stage"] == "act" for u in info["units"])
    if method == "qdiff":
        state = load_file(str(tmp_path / "quantized.safetensors"))
        assert any(k.endswith("input_quantizer_split.scale") for k in state)  # split shortcut
        assert any(k.endswith("softmax_quantizer.scale") for k in state)  # attention matmuls


def test_tfmq_checkpoint_reload_and_unseen_step_count(make_cfg, tmp_path):
    _run(make_cfg, "quantizer=tfmq", "bits=w8a8")
    quant_imgs = np.load(tmp_path / "samples.npz")["arr_0"].copy()
    moved = tmp_path / "tfmq.safetensors"
    (tmp_path / "quantized.safetensors").rename(moved)
    state = load_file(str(moved))
    assert state["conv_in.input_quantizer.step_scale"].numel() == 0  # conv_in stays FP in TFMQ
    tables = [v for k, v in state.items() if k.endswith("input_quantizer.step_scale") and v.numel()]
    assert tables and all(v.shape[0] == 10 for v in tables)
    _run(make_cfg, "task=sample", f"ckpt={moved}")
    assert np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], quant_imgs)
    from tfmq_exp.errors import UserError

    msg = r"sampler\.steps is 20 here, 10 in the checkpoint\. Fix: use sampler\.steps=10 "
    with pytest.raises(UserError, match=msg):
        _run(make_cfg, "task=sample", f"ckpt={moved}", "sampler.steps=20")

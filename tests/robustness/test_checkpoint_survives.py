"""Item 4: the checkpoint is written when quantization ends, so a failure in evaluation keeps it, the
folder is marked INCOMPLETE, and task=evaluate / task=sample with ckpt= finish the job from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfmq_exp.app import run
from tfmq_exp.errors import UserError


def test_checkpoint_survives_a_failure_in_evaluation(make_cfg, tmp_path):
    broken = tmp_path / "inception.pth"
    broken.write_bytes(b"not a weights file")  # exists, so the early checks pass; reading it fails later
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = make_cfg("debug=smoke", "quantizer=rtn", "bits=w8a8", f"evaluator.inception_weights={broken}",
                   "evaluator.n_samples=8",  # one batch of 8, as task=sample draws below
                   f"paths.output_dir={run_dir}")
    with pytest.raises(UserError, match=r"inception\.pth"):
        run(cfg)
    ckpt = run_dir / "quantized.safetensors"
    assert ckpt.is_file() and (run_dir / "INCOMPLETE").is_file()
    assert not (run_dir / "results.json").exists()
    quant_imgs = np.load(run_dir / "samples.npz")["arr_0"]

    # the checkpoint gives back the same quantized model: the same images from the same noise
    res = run(make_cfg("debug=smoke", "task=sample", f"ckpt={ckpt}"))
    assert np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], quant_imgs[: res["n"]])
    # and task=evaluate finishes the job in a folder that is then complete
    res = run(make_cfg("debug=smoke", "evaluator=none", "task=evaluate", f"ckpt={ckpt}"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True and saved["ckpt"] == str(ckpt) and res["n"] == 4  # n_grid images
    assert not (tmp_path / "INCOMPLETE").exists()

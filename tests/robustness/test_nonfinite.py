"""Item 1: NaN/Inf stops the run where it first appears, in one line; nothing poisoned is cached or scored.

(The same NaN weights file on the command line, exit 2 and one line: test_multirun.py.)
"""

from __future__ import annotations

import pytest
import torch
from robust_cli import write_weights

from tfmq_exp.app import run
from tfmq_exp.checks import NonFiniteError
from tfmq_exp.eval.similarity import similarity_metrics
from tfmq_exp.tasks.common import checked_model_fn

SMOKE = ("debug=smoke", "evaluator=none")


def test_nan_weights_file_stops_before_calibration(make_cfg, nan_weights, tmp_path):
    msg = (rf"^weights file {nan_weights}: tensor 'down_blocks\.1\.resnets\.0\.conv1\.weight' is not finite: "
           r"3 NaN and 1 Inf of 18432 values\. Fix: restore the weights file")
    cache = tmp_path / "own_cache"
    with pytest.raises(NonFiniteError, match=msg):
        run(make_cfg(*SMOKE, "quantizer=rtn", f"model.weights={nan_weights}", f"paths.cache_dir={cache}"))
    assert not (cache / "calib").exists()


@pytest.mark.parametrize("clip", ["true", "false"])
def test_model_with_overflowing_output_stops_at_the_calibration_record(make_cfg, tmp_path, clip):
    """The first model call of the calibration trajectories is checked, so an inf output stops there (with x0
    clipping the trajectories themselves would stay finite)."""
    def blow_up(state):  # finite weights whose output overflows float32 to inf
        state["conv_out.weight"] *= 1e38

    weights = write_weights(tmp_path / "huge.safetensors", blow_up)
    with pytest.raises(NonFiniteError, match=r"^calibration trajectories: the model output at t=900 is "
                                             r"not finite: \d+ NaN and \d+ Inf of \d+ values\. Fix:"):
        run(make_cfg(*SMOKE, "quantizer=rtn", f"model.weights={weights}", f"sampler.clip_x0={clip}",
                     f"paths.cache_dir={tmp_path}/own_cache"))
    calib = tmp_path / "own_cache" / "calib"
    assert not (calib.exists() and list(calib.glob("*.safetensors"))), "a poisoned record was cached"
    assert not (tmp_path / "results.json").exists() and (tmp_path / "INCOMPLETE").is_file()


def test_model_with_overflowing_output_never_gives_results(make_cfg, tmp_path):
    """With x0 clipping the trajectories stay finite while the model output is inf: sampling stops at that step."""
    weights = write_weights(tmp_path / "huge.safetensors", lambda s: s["conv_out.weight"].mul_(1e38))
    with pytest.raises(NonFiniteError, match=r"^FP samples: the model output at t=900 is not finite: 0 NaN and "
                                             r"\d+ Inf of 6272 values"):
        run(make_cfg(*SMOKE, "quantizer=fp", f"model.weights={weights}"))
    assert not (tmp_path / "results.json").exists() and (tmp_path / "INCOMPLETE").is_file()


def test_checked_model_fn_names_the_step():
    def fn(x, t):
        return x / 0.0 if int(t[0]) == 500 else x

    wrapped = checked_model_fn(fn, "tfmq w4a8 samples")
    x = torch.ones(2, 1, 4, 4)
    assert torch.equal(wrapped(x, torch.tensor([900, 900])), x)
    with pytest.raises(NonFiniteError, match=r"^tfmq w4a8 samples: the model output at t=500 is not finite: "
                                             r"0 NaN and 32 Inf of 32 values"):
        wrapped(x, torch.tensor([500, 500]))


def test_similarity_never_scores_non_finite_images_as_perfect():
    a = torch.full((2, 1, 16, 16), float("nan"))
    with pytest.raises(NonFiniteError, match=r"^images scored for similarity is not finite: 512 NaN"):
        similarity_metrics(a, a)
    b = torch.rand(2, 1, 16, 16)
    with pytest.raises(NonFiniteError, match=r"^FP reference images for similarity is not finite"):
        similarity_metrics(b, a)
    assert similarity_metrics(b, b)["psnr"] == 100.0  # finite identical images still score perfectly

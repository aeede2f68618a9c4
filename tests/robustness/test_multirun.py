"""Item 3: errors in a ``-m`` sweep, at composition and inside a job, are one line with the job, exit 2.

A sweep stops at its first failing job: jobs that finished keep their complete results, the failed
job's folder is marked INCOMPLETE, later jobs do not start.
"""

from __future__ import annotations

import json

from robust_cli import ASSET, cli, one_line_error


def test_composition_and_range_errors_stop_the_sweep_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    line = one_line_error(cli("debug=smoke", "seed=0,abc", cache=tmp_path / "c", run_dir=sweep, multirun=True))
    assert line.startswith("error: job #1 (debug=smoke seed=abc): invalid configuration: ")
    assert "'abc'" in line and "Fix:" in line
    line = one_line_error(cli("debug=smoke", "recon.iters=10,-1", cache=tmp_path / "c", run_dir=sweep,
                              multirun=True))
    assert line == ("error: job #1 (debug=smoke recon.iters=-1): recon.iters=-1 is out of range. Fix: set "
                    "recon.iters to an integer >= 0 (0 = no AdaRound: hard rounding of the initial state).")
    line = one_line_error(cli("debug=smoke", "quantizr.name=rtn,fp", cache=tmp_path / "c", run_dir=sweep,
                              multirun=True))
    assert line.startswith("error: job #0 (debug=smoke quantizr.name=rtn): invalid configuration: ")
    assert not sweep.exists()


def test_error_inside_a_job_keeps_the_finished_jobs(tmp_path, nan_weights):
    sweep = tmp_path / "sweep"
    proc = cli("debug=smoke", "evaluator=none", "quantizer=fp", f"model.weights={ASSET},{nan_weights}",
               cache=tmp_path / "c", run_dir=sweep, multirun=True)
    line = one_line_error(proc)
    assert line.startswith(f"error: job #1 (debug=smoke evaluator=none quantizer=fp model.weights={nan_weights}): "
                           f"weights file {nan_weights}: tensor 'down_blocks.1.resnets.0.conv1.weight' is not finite")
    done = json.loads((sweep / "0" / "results.json").read_text())
    assert done["complete"] is True and not (sweep / "0" / "INCOMPLETE").exists()
    assert (sweep / "1" / "INCOMPLETE").is_file() and not (sweep / "1" / "results.json").exists()
    assert line in (sweep / "1" / "app.log").read_text()

"""Item 3: Ctrl-C (a real SIGINT) gives one line, exit 130, and leaves nothing that looks finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from robust_cli import ROOT, one_line_error


def test_sigint_during_quantization(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "TFMQ_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tfmq_exp", "debug=smoke", "evaluator=none", "quantizer=brecq",
             f"hydra.run.dir={run_dir}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
            # a shell that starts jobs in the background ignores SIGINT for them; Ctrl-C is what we test
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 240
        seen = False
        for line in proc.stdout:  # the log on the console says which stage is running
            if "stage: quantization" in line:
                seen = True
                break
            assert time.monotonic() < deadline, "never reached quantization"
        assert seen
        time.sleep(1.0)  # inside AdaRound of the first units
        proc.send_signal(signal.SIGINT)
        proc.stdout.read()
        proc.wait(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err_path.read_text())
    line = one_line_error(result, code=130)
    assert line == ("error: interrupted during quantization; nothing half-written was kept (the run folder is "
                    "marked INCOMPLETE). Fix: run it again.")
    files = {p.name for p in run_dir.iterdir()}
    assert "INCOMPLETE" in files and "app.log" in files
    assert not files & {"results.json", "quantized.safetensors", "samples.npz", "samples.png"}
    assert not [f for f in files if f.endswith(".tmp")]
    marker = (run_dir / "INCOMPLETE").read_text()
    assert "task=quantize started" in marker and "stopped: interrupted during quantization" in marker
    assert line in (run_dir / "app.log").read_text()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt itself
def test_a_ctrl_c_swallowed_by_a_finalizer_stops_the_run_at_the_next_stage(monkeypatch):
    """A KeyboardInterrupt raised inside a ``__del__`` is printed as "Exception ignored" and lost (seen once in
    this test's CI run: the job finished with exit 0); the handler remembers it and the next stage raises it,
    reporting the stage that was running."""
    from tfmq_exp.tasks import common

    monkeypatch.setattr(common, "_interrupted", [False])
    monkeypatch.setattr(common, "_stage", ["quantization"])

    class Finalized:
        def __del__(self):
            common._on_sigint(signal.SIGINT, None)

    Finalized()  # the KeyboardInterrupt of its __del__ is ignored by Python
    try:
        common.set_stage("sampling")
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the swallowed Ctrl-C was forgotten")
    assert common.current_stage() == "quantization"

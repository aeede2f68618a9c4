"""A run killed with SIGKILL during reconstruction continues from its last finished unit when the same
command runs again (resume=true), and ends with the quantized model of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from robust_cli import ROOT
from safetensors.torch import load_file

from tfmq_exp.recon.resume import STATE, UnitCheckpoint

# 5 steps: what resumes is the weight stage, and FSC's Lp init searches (one per quantizer and step) would
# otherwise be most of each run's time
ARGS = ["debug=smoke", "evaluator=none", "quantizer=tfmq", "bits=w4a8", "recon.iters=20", "n_compare=4", "n_grid=4",
        "evaluator.n_samples=4", "sampler.steps=5"]


def command(run_dir: Path, resume: str) -> list[str]:
    return [sys.executable, "-m", "tfmq_exp", *ARGS, f"resume={resume}", f"hydra.run.dir={run_dir}"]


def env_for(cache: Path) -> dict[str, str]:
    return {**os.environ, "TFMQ_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_killed_run_resumes_from_the_last_unit_and_matches_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    ref = subprocess.run(command(tmp_path / "ref", "false"), cwd=ROOT, env=env_for(cache), capture_output=True,
                         text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert not (cache / "resume").exists()  # resume=false keeps no progress

    proc = subprocess.Popen(command(tmp_path / "killed", "true"), cwd=ROOT, env=env_for(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((cache / "resume").glob(f"*/{STATE}")) if (cache / "resume").is_dir() else []
        if found and len(UnitCheckpoint(found[0].parent).done) >= 3:  # TIAR and two blocks finished
            state = found[0]
            break
        time.sleep(0.05)
    assert state is not None and proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed = tmp_path / "killed"
    assert (killed / "INCOMPLETE").is_file() and not (killed / "results.json").exists()
    finished_before = len(UnitCheckpoint(state.parent).done)

    again = subprocess.run(command(tmp_path / "again", "true"), cwd=ROOT, env=env_for(cache), capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    log = (tmp_path / "again" / "app.log").read_text()
    assert f"resuming: {finished_before} finished unit(s)" in log
    a, b = load_file(str(tmp_path / "ref" / "quantized.safetensors")), load_file(str(tmp_path / "again" /
                                                                                     "quantized.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = json.loads((tmp_path / "again" / "results.json").read_text())
    ref_res = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert [u["unit"] for u in res["method_info"]["units"]] == [u["unit"] for u in ref_res["method_info"]["units"]]
    assert res["config_signature"] == ref_res["config_signature"]
    assert not state.exists() and (state.parent / "complete.json").is_file()  # progress dropped once complete

    # the same command once more: the configuration is complete, nothing is redone
    t0 = time.monotonic()
    third = subprocess.run(command(tmp_path / "third", "true"), cwd=ROOT, env=env_for(cache), capture_output=True,
                           text=True, timeout=900)
    assert third.returncode == 0
    assert "already finished in" in (tmp_path / "third" / "app.log").read_text()
    assert not (tmp_path / "third" / "quantized.safetensors").exists()
    assert time.monotonic() - t0 < 120


@pytest.mark.parametrize(("value", "slurm", "expect"), [("auto", None, False), ("auto", "123", True),
                                                         ("true", None, True), ("false", "123", False)])
def test_resume_auto_means_under_slurm(monkeypatch, value, slurm, expect):
    from omegaconf import OmegaConf

    from tfmq_exp.tasks.resume_run import resume_enabled

    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", slurm)
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert resume_enabled(OmegaConf.create({"resume": value})) is expect


def test_a_bad_resume_value_is_one_clear_line():
    from omegaconf import OmegaConf

    from tfmq_exp.errors import UserError
    from tfmq_exp.tasks.resume_run import resume_enabled

    with pytest.raises(UserError, match="resume=maybe is unknown. Fix: use resume=auto"):
        resume_enabled(OmegaConf.create({"resume": "maybe"}))


def test_a_resumed_job_keeps_its_wandb_run_id(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from tfmq_exp.tracking import make_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = OmegaConf.load(ROOT / "conf" / "logger" / "wandb.yaml")
    config = {"task": "quantize", "seed": 0, "model": {"name": "mnist"},
              "quantizer": {"name": "tfmq", "weight": {"n_bits": 4}, "act": {"n_bits": 8}}}
    ids = []
    for run in ("first", "requeued"):
        tracker = make_tracker(cfg, config, tmp_path / run, run_id="tfmq-0123456789abcdef")
        ids.append(tracker.run.id)
        tracker.finish()
    assert ids == ["tfmq-0123456789abcdef"] * 2

"""Sweep launchers: the Slurm launcher composes with the run's settings, and submitit's local launcher runs
a real two-job sweep (each job in its own process), as a Slurm sweep would on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from tfmq_exp.config import register_configs

ROOT = Path(__file__).resolve().parents[2]


def test_slurm_launcher_composes_with_requeue_and_the_trainer_devices():
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "trainer=gpu", "trainer.devices=4",
                                                       "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 1
    assert launcher.partition == "gpu" and launcher.max_num_timeout == 3 and launcher.signal_delay_s == 120
    assert list(launcher.setup) == []


def test_the_site_example_is_a_valid_local_override():
    register_configs()
    example = (ROOT / "conf" / "local" / "site.example.yaml").read_text()
    assert example.startswith("# @package _global_")
    import yaml

    site = yaml.safe_load(example)
    assert {"partition", "account", "setup"} <= set(site["hydra"]["launcher"])


def test_local_launcher_runs_a_two_job_sweep(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TFMQ_CACHE": str(tmp_path / "cache")}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tfmq_exp", "-m", "hydra/launcher=local", "debug=smoke", "evaluator=none",
           "quantizer=rtn", "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.launcher.cpus_per_task=1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in results)
    assert seeds == [0, 1] and all(json.loads(p.read_text())["complete"] for p in results)
    assert (sweep / ".submitit").is_dir()  # each job went through submitit, in its own process

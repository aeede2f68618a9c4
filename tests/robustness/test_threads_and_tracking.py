"""Items 6 and 7: W&B mode follows the user, thread count follows the CPUs the process may use."""

from __future__ import annotations

import logging

import pytest
import torch

from tfmq_exp.errors import UserError
from tfmq_exp.threads import cgroup_cpus, configure_threads, usable_cpus
from tfmq_exp.tracking import WandbTracker, api_key_source, choose_mode


@pytest.fixture
def home(tmp_path):
    return {"HOME": str(tmp_path)}


def test_config_mode_only_when_the_user_set_nothing(home):
    assert choose_mode("offline", env=home) == ("offline", "the config's default; no WANDB_MODE or API key set")
    assert choose_mode("disabled", env=home)[0] == "disabled"


def test_wandb_mode_env_wins_over_key_and_config(home):
    env = {**home, "WANDB_MODE": "offline", "WANDB_API_KEY": "x" * 40}
    assert choose_mode("online", env=env) == ("offline", "WANDB_MODE is set")
    assert choose_mode("offline", env={**home, "WANDB_MODE": "disabled"}) == ("disabled", "WANDB_MODE is set")


def test_api_key_means_online(home, tmp_path):
    assert choose_mode("offline", env={**home, "WANDB_API_KEY": "k"}) == (
        "online", "an API key is configured (WANDB_API_KEY is set)")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert api_key_source(home) == f"`wandb login` key for api.wandb.ai in {tmp_path / '.netrc'}"
    assert choose_mode("disabled", env=home)[0] == "online"


def test_command_line_wins_and_online_without_key_falls_back(home):
    env = {**home, "WANDB_MODE": "online", "WANDB_API_KEY": "k"}
    assert choose_mode("offline", cli_mode="disabled", env=env) == ("disabled", "logger.mode on the command line")
    mode, why = choose_mode("online", env=home)
    assert mode == "offline" and why.endswith("but no API key is configured (sync later with `wandb sync`)")
    with pytest.raises(UserError, match=r"^W&B mode 'sometimes' \(WANDB_MODE is set\) is not one of"):
        choose_mode("offline", env={**home, "WANDB_MODE": "sometimes"})


def test_tracker_logs_the_mode_and_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)  # fake: offline never uses it
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = type("C", (), {"mode": "online", "project": "p", "entity": None, "tags": []})()
    with caplog.at_level(logging.INFO, logger="tfmq_exp"):
        tracker = WandbTracker(cfg, {"a": 1}, tmp_path)
    try:
        assert tracker.mode == "offline"
        assert "W&B mode: offline (WANDB_MODE is set)" in caplog.text
    finally:
        tracker.finish()


def test_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpus(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(2, usable_cpus(tmp_path / "none"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_cpus(v1) == 3.0


def test_threads_follow_omp_or_the_usable_cpus(monkeypatch, caplog):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        with caplog.at_level(logging.INFO, logger="tfmq_exp"):
            n, why = configure_threads()
        assert (n, why) == (torch.get_num_threads(), "OMP_NUM_THREADS=1")
        assert f"torch threads: {n} (OMP_NUM_THREADS=1)" in caplog.text
        monkeypatch.delenv("OMP_NUM_THREADS")
        n, why = configure_threads()
        assert n == usable_cpus() == torch.get_num_threads() and why.startswith("CPUs this process may use")
    finally:
        torch.set_num_threads(before)

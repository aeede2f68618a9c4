"""Every option of every config group composes with the real config (Hydra compose API)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from tfmq_exp.precheck import CONF, group_options, groups

CASES = [(g, o) for g in sorted(groups()) for o in group_options(g)]


def test_every_group_has_options():
    assert {"model", "dataset", "sampler", "calib", "quantizer", "bits", "recon", "evaluator", "logger",
            "trainer", "paths", "experiment", "debug"} <= groups()
    assert set(group_options("bits")) == {"fp", "w8a32", "w4a32", "w8a8", "w4a8", "w4a4"}


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}")
    assert cfg.task == "quantize"
    assert cfg.quantizer.weight.n_bits in (2, 3, 4, 5, 6, 7, 8, 16, 32)


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_launchers_compose(launcher):
    from tfmq_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_


@pytest.mark.parametrize(("bits", "w", "a"), [("fp", 32, 32), ("w8a32", 8, 32), ("w4a8", 4, 8), ("w4a4", 4, 4)])
def test_bits_set_quantizer_widths(make_cfg, bits, w, a):
    cfg = make_cfg(f"bits={bits}")
    assert (cfg.quantizer.weight.n_bits, cfg.quantizer.act.n_bits) == (w, a)


def test_field_override_beats_bits_preset(make_cfg):
    cfg = make_cfg("bits=w4a8", "quantizer.weight.n_bits=6")
    assert cfg.quantizer.weight.n_bits == 6 and cfg.quantizer.act.n_bits == 8


def test_schema_rejects_wrong_type(make_cfg):
    with pytest.raises(Exception, match="seed"):
        make_cfg("seed=abc")

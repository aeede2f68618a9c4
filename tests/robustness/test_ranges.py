"""Item 2: every numeric setting is range-checked by the schema before any work, naming key, value and range."""

from __future__ import annotations

import pytest

from tfmq_exp.config import validate_config
from tfmq_exp.errors import UserError
from tfmq_exp.precheck import group_options, precheck


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("recon.iters=-5", r"^recon\.iters=-5 is out of range\. Fix: set recon\.iters to an integer >= 0 \(0 = no "),
        ("recon.act_iters=-1", r"recon\.act_iters=-1 .* >= 0 \(0 = no LSQ"),
        ("recon.batch_size=0", r"recon\.batch_size=0 is out of range\. Fix: .* an integer >= 1\.$"),
        ("recon.pool_size=-64", r"recon\.pool_size=-64 is out of range"),
        ("recon.weight_lr=0", r"recon\.weight_lr=0\.0 is out of range\. Fix: .* a number > 0 and <= 1\.$"),
        ("recon.act_lr=2", r"recon\.act_lr=2\.0 is out of range"),
        ("recon.warmup=1", r"recon\.warmup=1\.0 .* a number >= 0 and < 1\.$"),
        ("calib.n_trajectories=0", r"calib\.n_trajectories=0 is out of range"),
        ("calib.per_step=-1", r"calib\.per_step=-1 is out of range"),
        ("sampler.steps=0", r"sampler\.steps=0 is out of range"),
        ("sampler.eta=1.5", r"sampler\.eta=1\.5 .* a number >= 0 and <= 1\.$"),
        ("sampler.batch_size=-8", r"sampler\.batch_size=-8 is out of range"),
        ("quantizer.act_calib_samples=0", r"quantizer\.act_calib_samples=0 is out of range"),
        ("n_compare=0", r"^n_compare=0 is out of range"),
        ("model.train.ema_decay=1.0", r"model\.train\.ema_decay=1\.0 .* >= 0 and < 1"),
        ("evaluator.n_samples=0", r"evaluator\.n_samples=0 is out of range"),
        ("evaluator.kid_subsets=-1", r"evaluator\.kid_subsets=-1 is out of range"),
        ("evaluator.reference_n=0", r"evaluator\.reference_n=0 is out of range"),
        ("sampler.kind=euler", r"sampler\.kind=euler is not allowed\. Fix: use one of \['ddim', 'plms', 'ddpm'\]"),
        ("recon.cache_on=disk", r"recon\.cache_on=disk is not allowed"),
        ("recon.keep_fp_gb=-1", r"recon\.keep_fp_gb=-1\.0 is out of range"),
        ("recon.fp_precision=fp8", r"recon\.fp_precision=fp8 is not allowed\. Fix: use one of \['f32', 'bf16'"),
    ],
)
def test_out_of_range_values_are_named_with_the_range(make_cfg, override, message):
    with pytest.raises(UserError, match=message):
        validate_config(make_cfg(override))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quantizer.options.fsc_momentum=1.0", r"quantizer\.options\.fsc_momentum=1\.0 .* >= 0 and < 1"),
        ("quantizer.options.fsc_batch_size=0", r"quantizer\.options\.fsc_batch_size=0 is out of range"),
        ("quantizer.options.calib_steps=-2", r"quantizer\.options\.calib_steps=-2 is out of range"),
        ("quantizer.options.fsc_per_step=abc", r"quantizer\.options\.fsc_per_step='abc' is not a number"),
        ("quantizer.options.softmax_bits=1", r"quantizer\.options\.softmax_bits=1 .* >= 2 and <= 16"),
        ("quantizer.options.fsc_init_samples=2.5", r"fsc_init_samples=2\.5 is not a number\. Fix: .* an integer"),
    ],
)
def test_method_options_are_checked(make_cfg, override, message):
    with pytest.raises(UserError, match=message):
        validate_config(make_cfg("quantizer=tfmq", override))


def test_zero_iterations_mean_skip_and_pass(make_cfg):
    validate_config(make_cfg("recon.iters=0", "recon.act_iters=0", "model.train.warmup=0"))


@pytest.mark.parametrize("option", group_options("experiment"))
def test_every_shipped_preset_passes(make_cfg, option):
    validate_config(make_cfg(f"experiment={option}"))


@pytest.mark.parametrize("group", ["quantizer", "recon", "sampler", "evaluator", "calib", "debug"])
def test_every_shipped_option_passes(make_cfg, group):
    for option in group_options(group):
        validate_config(make_cfg(f"{group}={option}"))


def test_command_line_gets_the_range_error_before_hydra_starts():
    assert precheck(["recon.iters=-1"]).startswith("recon.iters=-1 is out of range")
    assert precheck(["debug=smoke"]) is None

"""Item 5: a checkpoint with per-step tables names exactly which sampler field differs on reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tfmq_exp.errors import UserError
from tfmq_exp.quant.quantizer import UniformQuantizer
from tfmq_exp.tasks.sample import check_schedule

SAVED = {"kind": "ddim", "steps": 10, "eta": 1.0, "skip": "uniform", "clip_x0": True}
TIMESTEPS = list(range(900, -1, -100))


def _unet(tables: bool) -> nn.Module:
    q = UniformQuantizer(n_bits=8)
    if tables:
        q.set_step_tables(torch.ones(10), torch.zeros(10))
    return nn.Sequential(q)


def _meta(**extra):
    return {"model": "mnist", "sampler": dict(SAVED, **extra), "timesteps": TIMESTEPS}


def test_same_sampler_passes():
    check_schedule(_meta(), TIMESTEPS, _unet(True), dict(SAVED))


@pytest.mark.parametrize(
    ("field", "now", "message"),
    [
        ("eta", 0.0, r"sampler\.eta is 0\.0 here, 1\.0 in the checkpoint\. Fix: use sampler\.eta=1\.0 \(the "),
        ("kind", "ddpm", r"sampler\.kind is ddpm here, ddim in the checkpoint\. Fix: use sampler\.kind=ddim "),
        ("skip", "quad", r"sampler\.skip is quad here, uniform in the checkpoint\. Fix: use sampler\.skip=uniform "),
        ("clip_x0", False, r"sampler\.clip_x0 is False here, True in the checkpoint"),
    ],
)
def test_each_differing_field_is_named(field, now, message):
    with pytest.raises(UserError, match=r"^this checkpoint's per-step activation tables were calibrated with "
                                        r"another sampler: " + message):
        check_schedule(_meta(), TIMESTEPS, _unet(True), dict(SAVED, **{field: now}))


def test_several_fields_and_guidance():
    now = dict(SAVED, steps=20, eta=0.0, guidance=7.5)
    with pytest.raises(UserError) as info:
        check_schedule(_meta(guidance=3.0), TIMESTEPS, _unet(True), now)
    msg = str(info.value)
    assert "sampler.eta is 0.0 here, 1.0 in the checkpoint; sampler.guidance is 7.5 here, 3.0 in the " in msg
    assert "sampler.steps is 20 here, 10 in the checkpoint" in msg
    assert msg.endswith("Fix: use sampler.eta=1.0 sampler.guidance=3.0 sampler.steps=10 (the quantize run's sampler).")


def test_timesteps_alone_differ_when_the_training_schedule_changed():
    with pytest.raises(UserError, match=r"the 10 timesteps here differ from the checkpoint's 10"):
        check_schedule(_meta(), [t + 1 for t in TIMESTEPS], _unet(True), dict(SAVED))


def test_without_step_tables_any_sampler_is_fine():
    check_schedule(_meta(), TIMESTEPS[:5], _unet(False), dict(SAVED, steps=5, eta=0.0))


def test_a_checkpoint_older_than_the_guidance_field_reads_as_unguided():
    """Checkpoints written before the sampler recorded its guidance scale load with guidance 1 (none) and
    are refused, naming the fix, with any other."""
    check_schedule(_meta(), TIMESTEPS, _unet(True), dict(SAVED, guidance=1.0))
    with pytest.raises(UserError, match=r"sampler\.guidance is 3\.0 here, 1\.0 in the checkpoint\. "
                                        r"Fix: use sampler\.guidance=1\.0 \(the quantize run's sampler\)\.$"):
        check_schedule(_meta(), TIMESTEPS, _unet(True), dict(SAVED, guidance=3.0))

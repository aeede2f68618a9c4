"""Item 2 (paths) and item 3 (unwritable folders): what a later stage needs is checked before the first
expensive stage, in one line naming the key and the fix."""

from __future__ import annotations

import pytest
from robust_cli import cli, one_line_error

from tfmq_exp.app import run
from tfmq_exp.errors import UserError

SMOKE = ("debug=smoke", "evaluator=none", "quantizer=rtn")


def _nothing_computed(cache_dir):
    assert not (cache_dir / "calib").exists(), "the calibration record was started before the check"


@pytest.fixture
def fresh(tmp_path):
    """A cache of this test's own (the shared one is filled by other tests) and the override naming it."""
    cache = tmp_path / "own_cache"
    return cache, f"paths.cache_dir={cache}"


def test_unwritable_cache_folder(make_cfg, tmp_path, cache_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=rf"^paths\.cache_dir={blocker}/cache is not a writable folder \(.*\)\. "
                                        r"Fix: set paths\.cache_dir to a folder you can write to\.$"):
        run(make_cfg(*SMOKE, f"paths.cache_dir={blocker}/cache"))


def test_missing_reference_set_fails_before_calibration(make_cfg, tmp_path, fresh):
    cache_dir, own = fresh
    with pytest.raises(UserError, match=r"^dataset\.path=.*/no_such_folder: no such file or folder\. Fix: point"):
        run(make_cfg("debug=smoke", "quantizer=rtn", "dataset=cifar10", f"dataset.path={tmp_path}/no_such_folder",
                     own))
    with pytest.raises(UserError, match=r"^no reference set for FID: dataset\.path and evaluator\.reference are "
                                        r"null\. Fix: set dataset\.path"):
        run(make_cfg("debug=smoke", "quantizer=rtn", "dataset=cifar10", own))
    _nothing_computed(cache_dir)


def test_missing_inception_weights_and_prompts_and_checkpoint(make_cfg, tmp_path, fresh):
    cache_dir, own = fresh
    with pytest.raises(UserError, match=r"^evaluator\.inception_weights=.*/w\.pth: no such file\. Fix: point it at"):
        run(make_cfg("debug=smoke", "quantizer=rtn", f"evaluator.inception_weights={tmp_path}/w.pth", own))
    with pytest.raises(UserError, match=r"^dataset\.prompts=.*/p\.txt: no such file\."):
        run(make_cfg(*SMOKE, f"dataset.prompts={tmp_path}/p.txt", own))
    with pytest.raises(UserError, match=r"^ckpt=.*/q\.safetensors: no such file\. Fix: pass a quantized\.safetensors"):
        run(make_cfg("debug=smoke", "evaluator=none", "task=sample", f"ckpt={tmp_path}/q.safetensors", own))
    _nothing_computed(cache_dir)


def test_negative_budget_on_the_command_line(tmp_path):
    line = one_line_error(cli("debug=smoke", "recon.iters=-100", cache=tmp_path / "c", run_dir=tmp_path / "run"))
    assert line == ("error: recon.iters=-100 is out of range. Fix: set recon.iters to an integer >= 0 "
                    "(0 = no AdaRound: hard rounding of the initial state).")
    assert not (tmp_path / "run").exists()


def test_unwritable_run_and_cache_folders_on_the_command_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = one_line_error(cli("debug=smoke", cache=tmp_path / "c", run_dir=blocker / "run"))
    assert line.startswith(f"error: cannot create the run folder under hydra.run.dir={blocker}/run (")
    assert line.endswith("Fix: set hydra.run.dir=PATH to a writable folder.")
    # the cache folder is checked inside the run, which writes the error to its app.log too
    proc = cli(*SMOKE, f"paths.cache_dir={blocker}/cache", cache=tmp_path / "c", run_dir=tmp_path / "run")
    line = one_line_error(proc)
    assert line.startswith(f"error: paths.cache_dir={blocker}/cache is not a writable folder")
    assert line in (tmp_path / "run" / "app.log").read_text()
    assert f"stopped: {line.removeprefix('error: ')}" in (tmp_path / "run" / "INCOMPLETE").read_text()

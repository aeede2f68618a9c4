"""Bad input: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tfmq_exp", *args, f"hydra.run.dir={cwd}/run"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_invalid_bits(tmp_path):
    line = one_line_error(cli("bits=w3a9", cwd=tmp_path))
    assert "unknown bits 'w3a9'" in line and "w4a8" in line and "quantizer.weight.n_bits" in line
    assert not (tmp_path / "run").exists()


def test_unknown_option(tmp_path):
    line = one_line_error(cli("quantizer=nope", cwd=tmp_path))
    assert "unknown quantizer 'nope'" in line and "rtn" in line


def test_unknown_key(tmp_path):
    line = one_line_error(cli("quantizr.name=rtn", cwd=tmp_path))
    assert "quantizr" in line and "Fix:" in line


def test_missing_weights_file(tmp_path):
    line = one_line_error(cli(f"model.weights={tmp_path}/nope.safetensors", "debug=smoke", cwd=tmp_path))
    assert "model weights not found" in line and "nope.safetensors" in line and "Fix:" in line


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    line = one_line_error(cli(f"model.weights={bad}", "debug=smoke", cwd=tmp_path))
    assert "not a valid safetensors file" in line and "Fix:" in line


def test_traceback_flag_shows_it(tmp_path):
    proc = cli(f"model.weights={tmp_path}/nope.safetensors", "traceback=true", "debug=smoke", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_bits_out_of_range_by_field(tmp_path):
    line = one_line_error(cli("quantizer.weight.n_bits=9", "debug=smoke", cwd=tmp_path))
    assert "n_bits=9" in line and "Fix:" in line


@pytest.mark.parametrize("steps", ["7"])
def test_step_count_that_does_not_divide(tmp_path, steps):
    line = one_line_error(cli(f"sampler.steps={steps}", "debug=smoke", "calib.n_trajectories=2", cwd=tmp_path))
    assert "sampler.steps" in line and "divide" in line

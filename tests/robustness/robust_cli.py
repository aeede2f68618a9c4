"""Helpers for the robustness tests: the CLI in a subprocess, one-line errors, damaged weight files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "tfmq_exp" / "assets" / "mnist_unet.safetensors"


def cli(*args: str, cache: Path, run_dir: Path | None = None, multirun: bool = False, env: dict | None = None,
        timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m tfmq_exp ARGS`` with its own cache and run folder, one torch thread."""
    where = [] if run_dir is None else [f"hydra.{'sweep' if multirun else 'run'}.dir={run_dir}"]
    full_env = {**os.environ, "TFMQ_CACHE": str(cache), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tfmq_exp", *(["-m"] if multirun else []), *args, *where],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=full_env)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single ``error: ...`` line of a failed run (exit ``code``, no traceback)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def write_weights(path: Path, change) -> Path:
    """A copy of the committed MNIST weights (as float32) after ``change(state)``."""
    state = {k: v.float() for k, v in load_file(str(ASSET)).items()}
    change(state)
    save_file(state, str(path))
    return path

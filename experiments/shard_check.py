"""Check that sampling sharded over N processes gives the images of one process, through the app:
``task=sample`` on 1 process and on 2 CPU processes (Fabric DDP, gloo), then compare samples.npz.

    python experiments/shard_check.py      # writes experiments/results/shard_check.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "results" / "shard_check"


def run(devices: int) -> np.ndarray:
    folder = OUT / f"devices_{devices}"
    strategy = "ddp" if devices > 1 else "auto"
    cmd = [sys.executable, "-m", "tfmq_exp", "task=sample", "n_compare=24", "sampler.steps=10",
           "trainer.accelerator=cpu", f"trainer.devices={devices}", f"trainer.strategy={strategy}",
           f"hydra.run.dir={folder}"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return np.load(folder / "samples.npz")["arr_0"]


def main() -> None:
    one, two = run(1), run(2)
    same = bool(np.array_equal(one, two))
    result = {"n": int(one.shape[0]), "devices": [1, 2], "identical": same}
    (OUT.parent / "shard_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not same:
        raise SystemExit("sharded sampling differs from one process")


if __name__ == "__main__":
    main()

"""Resuming a killed or preempted quantization from the last finished reconstruction unit.

After each unit the quantized model's state (the hard roundings so far) and the finished units' reports
are written as one safetensors file, atomically: the reports ride in its metadata, so the two can never
disagree. A rerun of the same configuration loads it into the freshly prepared model and skips the
finished units. Each unit's randomness is seeded from the run seed and the unit's index, and a unit's
inputs depend only on the roundings before it, so the resumed model equals an uninterrupted run's bit
for bit on the same machine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from tfmq_exp import cache_io

log = logging.getLogger("tfmq_exp")
STATE = "units.safetensors"
COMPLETE = "complete.json"


class UnitCheckpoint:
    """Per-unit progress of one configuration, kept in ``folder`` (one folder per config signature)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.done: dict[str, dict[str, Any]] = {}
        self._state: dict[str, Any] | None = None
        path = self.folder / STATE
        if path.is_file():
            loaded = cache_io.read_or_miss(path, _read, "resume state")
            if loaded is not None:
                self._state, self.done = loaded
                log.info("resuming: %d finished unit(s) in %s", len(self.done), path)

    @property
    def completed(self) -> dict[str, Any] | None:
        """What a finished run of this configuration left: {"run_dir", "results"}, or None."""
        path = self.folder / COMPLETE
        return json.loads(path.read_text()) if path.is_file() else None

    def restore(self, qmodel: nn.Module) -> None:
        """Give the freshly prepared model the roundings of the finished units."""
        if self._state is not None:  # on the CPU, before the model moves to its device
            qmodel.load_state_dict(self._state, strict=True)

    def record(self, qmodel: nn.Module, name: str, report: dict[str, Any]) -> None:
        """Unit ``name`` is finished: save the model's state and every finished unit's report, atomically."""
        self.done[name] = report
        state = {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        cache_io.save_safetensors(self.folder / STATE, state, {"done": json.dumps(self.done, default=str)})

    def finish(self, run_dir: Path, results: Path) -> None:
        """The run completed: remember where, and drop the per-unit state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        cache_io.write_json(self.folder / COMPLETE, {"run_dir": str(run_dir), "results": str(results)})
        (self.folder / STATE).unlink(missing_ok=True)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        done = json.loads((f.metadata() or {})["done"])
    return load_file(str(path)), done

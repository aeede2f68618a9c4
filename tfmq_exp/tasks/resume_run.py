"""Which runs resume (``resume=``), and where a configuration's per-unit progress is kept.

``resume=auto`` (the default) resumes under Slurm, where preempted jobs are requeued with the same
command; ``resume=true`` everywhere; ``resume=false`` never. The progress of a configuration lives in
``<paths.cache_dir>/resume/<config signature>/``, so a requeued job or a rerun of the same command finds it
whatever its new run folder is; a configuration that already finished is not redone.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tfmq_exp.errors import UserError
from tfmq_exp.recon.resume import UnitCheckpoint
from tfmq_exp.results import config_signature

log = logging.getLogger("tfmq_exp")


def resume_enabled(cfg: DictConfig) -> bool:
    value = str(cfg.get("resume", "auto")).lower()
    if value == "auto":
        return bool(os.environ.get("SLURM_JOB_ID"))
    if value in ("true", "false"):
        return value == "true"
    raise UserError(f"resume={cfg.get('resume')} is unknown. Fix: use resume=auto (under Slurm), true or false.")


def unit_checkpoint(cfg: DictConfig) -> UnitCheckpoint | None:
    if not resume_enabled(cfg) or cfg.quantizer.name in ("fp", "rtn"):
        return None
    return UnitCheckpoint(Path(cfg.paths.cache_dir).expanduser() / "resume" / config_signature(cfg))


def finished_results(ckpt: UnitCheckpoint | None) -> dict[str, Any] | None:
    """The results of a finished run of this configuration, if its results.json is still there."""
    done = ckpt.completed if ckpt is not None else None
    if not done or not Path(done["results"]).is_file():
        return None
    results = json.loads(Path(done["results"]).read_text())
    if not results.get("complete"):
        return None
    log.info("this configuration already finished in %s; nothing redone (resume=false to run it again)",
             done["run_dir"])
    return results

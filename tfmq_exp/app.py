"""Hydra entry point: ``python -m tfmq_exp [overrides]``."""

from __future__ import annotations

import errno
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tfmq_exp.config import register_configs
from tfmq_exp.errors import UserError

register_configs()

log = logging.getLogger("tfmq_exp")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check the config, run the configured task and return its results dict.

    The run folder holds an INCOMPLETE marker from the first checks until the task has written
    everything, so a folder whose run failed or was interrupted never looks finished.
    """
    from tfmq_exp.results import INCOMPLETE, mark_complete, mark_incomplete
    from tfmq_exp.tasks.common import preflight

    try:
        mark_incomplete(Path(cfg.paths.output_dir), str(cfg.task))
    except OSError:
        pass  # an unwritable output folder: preflight names it in one line
    out = preflight(cfg)
    if not (out / INCOMPLETE).exists():  # the folder did not exist before preflight made it
        mark_incomplete(out, str(cfg.task))
    results = _run_task(cfg, out)
    if results.get("rank", 0) == 0:
        mark_complete(out)
    return results


def _run_task(cfg: DictConfig, out: Path) -> dict[str, Any]:
    if cfg.task == "train":
        from tfmq_exp.tasks.train import run_train

        return run_train(cfg, out)
    if cfg.task == "quantize":
        from tfmq_exp.tasks.quantize import run_quantize

        return run_quantize(cfg, out)
    if cfg.task == "sample":
        from tfmq_exp.tasks.sample import run_sample

        return run_sample(cfg, out)
    if cfg.task == "evaluate":
        from tfmq_exp.tasks.evaluate import run_evaluate

        return run_evaluate(cfg, out)
    if cfg.task == "export":
        from tfmq_exp.tasks.export import run_export

        return run_export(cfg, out)
    raise UserError(f"unknown task '{cfg.task}'. Fix: use task=quantize, train, sample, evaluate or export.")


WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR)


def fail(cfg: DictConfig, message: str, code: int) -> None:
    """Print ``error: message`` (one line, prefixed with the job in a sweep), log it to app.log, exit."""
    from tfmq_exp.results import note_failure

    if cfg.get("traceback"):
        traceback.print_exc()
    message = f"{_job_label()}{message}"
    print(f"error: {message}", file=sys.stderr)
    _log_to_file(f"error: {message}")
    note_failure(Path(cfg.paths.output_dir), message)
    sys.exit(code)


def _job_label() -> str:
    """``job #N (overrides): `` inside a multirun, else empty."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"job #{hc.job.num} ({' '.join(hc.overrides.task)}): "
    except ValueError:  # not under Hydra (tests call run() directly)
        pass
    return ""


def _log_to_file(line: str) -> None:
    """The run's app.log gets the error too; the console already has it from print()."""
    record = logging.LogRecord("tfmq_exp", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from tfmq_exp.tasks.common import current_stage, install_sigint_handler

    install_sigint_handler()
    try:
        results = run(cfg)
    except UserError as err:
        fail(cfg, str(err), err.exit_code)
    except KeyboardInterrupt:
        ckpt = Path(cfg.paths.output_dir) / "quantized.safetensors"
        fix = (f"finish it with task=evaluate ckpt={ckpt} (same model and sampler)" if ckpt.is_file()
               else "run it again")
        fail(cfg, f"interrupted during {current_stage()}; nothing half-written was kept (the run folder is "
                  f"marked INCOMPLETE). Fix: {fix}.", 130)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        where = err.filename or cfg.paths.output_dir
        fail(cfg, f"cannot write {where}: {err.strerror}. Fix: free space or point paths.cache_dir / "
                  "hydra.run.dir at a writable folder.", 2)
    return results.get("objective")


def main() -> None:
    from tfmq_exp.precheck import precheck

    try:
        problem = precheck(sys.argv[1:])
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        hydra_main()
    except KeyboardInterrupt:  # before a job's own handler is in place: nothing was started
        print("error: interrupted while the run was being set up; no results were written. Fix: run it again.",
              file=sys.stderr)
        sys.exit(130)

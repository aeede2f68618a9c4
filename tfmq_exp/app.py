"""Hydra entry point: ``python -m tfmq_exp [overrides]``."""

from __future__ import annotations

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
    """Run the configured task and return its results dict."""
    out = Path(cfg.paths.output_dir)
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
    raise UserError(f"unknown task '{cfg.task}'. Fix: use task=quantize, train, sample or evaluate.")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except UserError as err:
        if cfg.get("traceback"):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    return results.get("objective")


def main() -> None:
    from tfmq_exp.precheck import precheck

    problem = precheck(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_main()

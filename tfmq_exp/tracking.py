"""Experiment tracking: W&B when logger=wandb (offline when no API key is configured), else nothing."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullTracker:
    def log(self, data: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, cfg: Any, config: dict[str, Any], out: Path) -> None:
        import wandb

        mode = cfg.mode
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
            log.warning("no W&B API key configured: logging offline (sync later with `wandb sync`)")
            mode = "offline"
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=mode,
            config=config,
            dir=str(out),
            tags=list(cfg.tags),
            reinit="finish_previous",
        )

    def log(self, data: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in data.items() if isinstance(v, (int, float))})

    def finish(self) -> None:
        self.run.finish()


def make_tracker(cfg: Any, config: dict[str, Any], out: Path) -> NullTracker | WandbTracker:
    if cfg.name == "wandb":
        return WandbTracker(cfg, config, out)
    return NullTracker()

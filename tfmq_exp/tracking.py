"""Experiment tracking: W&B when logger=wandb, else nothing.

The W&B mode follows the user first: a ``logger.mode=`` on the command line, then ``WANDB_MODE``,
then a configured API key (``WANDB_API_KEY`` or ``wandb login``'s netrc entry) meaning online; the
config file's mode is used only when the user set none of these. The log says which and why.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tfmq_exp.errors import UserError

log = logging.getLogger("tfmq_exp")
MODES = ("online", "offline", "disabled")


class NullTracker:
    def log(self, data: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def api_key_source(env: dict[str, str] | None = None) -> str | None:
    """Where a W&B API key is configured (``WANDB_API_KEY`` or the netrc entry `wandb login` writes), else None."""
    env = dict(os.environ) if env is None else env
    if env.get("WANDB_API_KEY"):
        return "WANDB_API_KEY is set"
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc").expanduser()
    try:
        if path.is_file() and netrc.netrc(str(path)).authenticators(host):
            return f"`wandb login` key for {host} in {path}"
    except (netrc.NetrcParseError, OSError):
        pass
    return None


def choose_mode(config_mode: str, cli_mode: str | None = None, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(mode, why): command line > WANDB_MODE > a configured key (online) > the config file's mode."""
    env = dict(os.environ) if env is None else env
    if cli_mode:
        mode, why = cli_mode, "logger.mode on the command line"
    elif env.get("WANDB_MODE"):
        mode, why = env["WANDB_MODE"].lower(), "WANDB_MODE is set"
        if mode == "dryrun":
            mode = "offline"
    elif str(env.get("WANDB_DISABLED", "")).lower() in ("1", "true", "yes"):
        mode, why = "disabled", "WANDB_DISABLED is set"
    elif api_key_source(env):
        mode, why = "online", f"an API key is configured ({api_key_source(env)})"
    else:
        mode, why = config_mode, "the config's default; no WANDB_MODE or API key set"
    if mode not in MODES:
        raise UserError(f"W&B mode '{mode}' ({why}) is not one of {list(MODES)}. Fix: use online, offline or disabled.")
    if mode == "online" and not api_key_source(env):
        mode, why = "offline", f"{why}, but no API key is configured (sync later with `wandb sync`)"
    return mode, why


def cli_logger_mode() -> str | None:
    """The value of a ``logger.mode=`` override on this run's command line, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task_overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra
        return None
    for o in task_overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "logger.mode":
            return value
    return None


class WandbTracker:
    def __init__(self, cfg: Any, config: dict[str, Any], out: Path) -> None:
        import wandb

        mode, why = choose_mode(str(cfg.mode), cli_logger_mode())
        log.info("W&B mode: %s (%s)", mode, why)
        self.mode = mode
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

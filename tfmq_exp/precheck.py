"""Turn bad command lines into one line naming the problem and the fix, before Hydra starts.

Hydra's own messages for an unknown option span several lines and exit with 1; users of a
sweep want ``error: ...`` and exit code 2, with nothing written.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parent.parent / "conf"
HINTS = {"bits": " (other widths: quantizer.weight.n_bits=N quantizer.act.n_bits=N)"}


def group_options(group: str) -> list[str]:
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def groups() -> set[str]:
    return {p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "local")}


def check_group_values(overrides: list[str]) -> str | None:
    known = groups()
    for arg in overrides:
        if "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in known:
            continue
        for choice in value.split(","):
            choice = choice.strip()
            if choice in ("", "null") or choice.startswith(("glob(", "range(", "choice(")):
                continue
            if not (CONF / key / f"{choice}.yaml").is_file():
                opts = ", ".join(group_options(key))
                return f"unknown {key} '{choice}'. Fix: use {key}=<one of: {opts}>{HINTS.get(key, '')}"
    return None


def check_compose(overrides: list[str]) -> str | None:
    """Compose the config as the run would (without Hydra's own settings) and report the first problem."""
    from tfmq_exp.config import register_configs

    register_configs()
    mine = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name="config", overrides=mine)
    except Exception as err:  # noqa: BLE001  (any composition failure is the user's input)
        parts = [str(err).strip().splitlines()[0]] if str(err).strip() else [type(err).__name__]
        cause = err.__cause__
        if cause is not None and str(cause).strip():
            parts.append(str(cause).strip().splitlines()[0])
        fix = "check the override against `python -m tfmq_exp --cfg job`"
        return f"invalid configuration: {' - '.join(parts)}. Fix: {fix}"
    return None


def precheck(argv: list[str]) -> str | None:
    """The first problem with the command line, or None."""
    flags = [a for a in argv if a.startswith("-")]
    overrides = [a for a in argv if not a.startswith("-")]
    problem = check_group_values(overrides)
    if problem or flags:
        return problem  # multirun sweeps and --cfg/--help go to Hydra as they are
    return check_compose(overrides)

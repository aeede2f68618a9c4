"""Turn bad command lines into one line naming the problem and the fix, before Hydra starts.

Hydra's own messages for an unknown option span several lines and exit with 1; users of a
sweep want ``error: ...`` and exit code 2, with nothing written.
"""

from __future__ import annotations

import tempfile
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
    """Compose the config as the run would (without Hydra's own settings), range-check it, report the first problem."""
    from tfmq_exp.config import register_configs, validate_config
    from tfmq_exp.errors import UserError

    register_configs()
    mine = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=mine)
    except Exception as err:  # noqa: BLE001  (any composition failure is the user's input)
        parts = [str(err).strip().splitlines()[0]] if str(err).strip() else [type(err).__name__]
        cause = err.__cause__
        if cause is not None and str(cause).strip():
            parts.append(str(cause).strip().splitlines()[0])
        fix = "check the override against `python -m tfmq_exp --cfg job`"
        return f"invalid configuration: {' - '.join(parts)}. Fix: {fix}"
    try:
        validate_config(cfg, with_paths=False)
    except UserError as err:
        return str(err)
    return None


def sweep_jobs(overrides: list[str]) -> list[list[str]] | str:
    """The override list of each job of a ``-m`` sweep (Hydra's basic sweeper expansion), or a problem."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if "=" in o])
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"invalid sweep: {first}. Fix: write sweeps as key=a,b or key=range(0,3)"


def check_sweep(overrides: list[str], limit: int = 200) -> str | None:
    """Compose and range-check every job of a sweep before the first one starts (the first ``limit`` jobs)."""
    jobs = sweep_jobs(overrides)
    if isinstance(jobs, str):
        return jobs
    for num, job in enumerate(jobs[:limit]):
        problem = check_compose(job)
        if problem:
            mine = " ".join(o for o in job if not o.lstrip("+~").startswith("hydra"))
            return f"job #{num} ({mine}): {problem}"
    return None


def run_folder_problem(overrides: list[str], multirun: bool) -> str | None:
    """The folder Hydra will create for the run (hydra.run.dir / hydra.sweep.dir) must be creatable."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), None)
    target = Path(value.split("${")[0] if value else ".").expanduser().absolute()
    base = target
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(f"{base} is not a folder")
        tempfile.TemporaryDirectory(dir=base, prefix=".tfmq_write_test_").cleanup()
    except OSError as err:
        what = f"{key}={value}" if value else f"the current folder {target}"
        why = err.strerror or str(err)
        return f"cannot create the run folder under {what} ({why}). Fix: set {key}=PATH to a writable folder."
    return None


def precheck(argv: list[str]) -> str | None:
    """The first problem with the command line, or None."""
    flags = [a for a in argv if a.startswith("-")]
    overrides = [a for a in argv if not a.startswith("-")]
    problem = check_group_values(overrides)
    multirun = bool(flags) and set(flags) <= {"-m", "--multirun"}
    if problem or (flags and not multirun):
        return problem  # --cfg/--help/--info go to Hydra as they are
    problem = check_sweep(overrides) if multirun else check_compose(overrides)
    return problem or run_folder_problem(overrides, multirun)

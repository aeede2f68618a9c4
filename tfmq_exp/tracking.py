"""Experiment tracking: logger=wandb (W&B dashboard), logger=csv (files in the run folder), else nothing.

The W&B mode follows the user first: a ``logger.mode=`` on the command line, then ``WANDB_MODE``,
then a configured API key (``WANDB_API_KEY`` or ``wandb login``'s netrc entry) meaning online; the
config file's mode is used only when the user set none of these. The log says which and why.

What a tracker gets from task=quantize (docs/tracking.md): the resolved config and the command-line
overrides at the start, then ``log_results`` with results.json's content, the run folder (samples.png,
temporal_error.png, quantized.safetensors) and the quantized model, whose per-step activation tables
(FSC) become ``fsc_ranges.png``. A W&B failure after the config checks costs one warning line, never
the run: the quantization and its files are worth more than the dashboard.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tfmq_exp.errors import UserError

log = logging.getLogger("tfmq_exp")
MODES = ("online", "offline", "disabled")
LOGGERS = ("none", "csv", "wandb")

# Summaries a sweep is compared on (names as in results.json "metrics"): lower is better, higher is better.
LOWER_BETTER = ("fid", "sfid", "kid_mean", "fp_mse", "temporal_rel_l2_mean", "temporal_fraction_shifted", "objective")
HIGHER_BETTER = ("is", "clip_score", "class_accuracy", "fp_psnr", "fp_ssim", "precision", "recall", "f_score",
                 "temporal_cosine_mean")
# columns of the per-unit table, in this order, where the units of method_info have them
UNIT_COLUMNS = ("unit", "kind", "stage", "loss_before", "loss_after", "wall_s", "iters")
# run-folder files shown on the dashboard: key -> (file, caption)
IMAGES = {
    "samples": ("samples.png", "top row: FP model, bottom row: quantized model (same noise)"),
    "temporal_error": ("temporal_error.png", "temporal feature error per sampling step"),
}
FSC_PLOT = "fsc_ranges.png"


# ---------------------------------------------------------------------------------------------- W&B mode


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


def hydra_context() -> tuple[list[str], str | None, int | None]:
    """(command-line overrides, sweep folder name, job number) of this Hydra job; ([], None, None) outside Hydra.

    The sweep name and job number are set in a multirun only.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ValueError, ImportError):  # not under Hydra (tests call run() directly)
        return [], None, None
    overrides = [str(o) for o in hc.overrides.task]
    if hc.mode == RunMode.MULTIRUN:
        return overrides, Path(str(hc.sweep.dir)).name or None, int(hc.job.num)
    return overrides, None, None


def cli_logger_mode() -> str | None:
    """The value of a ``logger.mode=`` override on this run's command line, if any."""
    for o in hydra_context()[0]:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "logger.mode":
            return value
    return None


# ---------------------------------------------------------------------------------------------- what is logged


def scalars(data: dict[str, Any]) -> dict[str, int | float]:
    """The plain numbers of ``data`` (no bools, strings such as "unavailable: ...", lists or dicts)."""
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _get(d: Any, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def bits_of(config: dict[str, Any]) -> str | None:
    """The bits label results.json will carry (tasks/common.py bits_label), from the config alone."""
    q = _get(config, "quantizer.name")
    if q is None:
        return None
    w, a = _get(config, "quantizer.weight.n_bits"), _get(config, "quantizer.act.n_bits")
    if q == "fp" or w is None or a is None or (int(w) >= 32 and int(a) >= 32):
        return "fp"
    return f"w{int(w)}a{int(a)}"


def run_name(config: dict[str, Any], job_num: int | None = None) -> str | None:
    """``tfmq-w4a8-s0`` (quantizer, bits, seed), with ``-j3`` for job 3 of a multirun; None without a quantizer."""
    q, bits = _get(config, "quantizer.name"), bits_of(config)
    if q is None:
        return None
    name = q if bits in (None, "fp") else f"{q}-{bits}"
    if _get(config, "seed") is not None:
        name += f"-s{_get(config, 'seed')}"
    return name if job_num is None else f"{name}-j{job_num}"


def run_tags(config: dict[str, Any], user_tags: Any) -> list[str]:
    """Model, quantizer, bits, then the user's logger.tags; no repeats, W&B's 64-character limit."""
    tags = [_get(config, "model.name"), _get(config, "quantizer.name"), bits_of(config), *list(user_tags or [])]
    out: list[str] = []
    for t in tags:
        if t is not None and str(t) and str(t)[:64] not in out:
            out.append(str(t)[:64])
    return out


def unit_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of results.json["method_info"]["units"]: one row per reconstructed unit and stage."""
    units = _get(results, "method_info.units") or []
    units = [u for u in units if isinstance(u, dict)]
    columns = [c for c in UNIT_COLUMNS if any(c in u for u in units)]
    return columns, [[u.get(c) for c in columns] for u in units]


def step_range_widths(model: Any, max_quantizers: int = 8) -> dict[str, list[float]]:
    """Range width ``scale * (qmax - qmin)`` per sampling step of up to ``max_quantizers`` activation
    quantizers holding per-step (FSC) tables: the temporal information block's inputs (``*.time_emb_proj``,
    ``time_embedding.*``) first, then others spread over the network. Quantizers with the very same tables
    (every ``time_emb_proj`` reads the same activated embedding) are drawn once, their name followed by
    ``(+N same)``. Empty when the model has no step tables (every method but TFMQ's FSC)."""
    temporal = _temporal_layers(model)
    groups: dict[tuple[float, ...], list[str]] = {}
    in_tib: set[tuple[float, ...]] = set()
    for name, q in model.named_modules():
        if not getattr(q, "has_step_tables", False):
            continue
        table = q.step_scale.detach().float().cpu()
        levels = (q.qmax - q.qmin) if hasattr(q, "qmax") else 2 ** int(q.n_bits) - 1
        # per-tensor tables are (S,); anything wider shows its widest channel
        widths = tuple((table.reshape(table.shape[0], -1).amax(1) * levels).tolist())
        groups.setdefault(widths, []).append(name.removesuffix(".input_quantizer"))
        layer = name.rpartition(".")[0]
        if layer in temporal or ".time_emb_proj." in f".{layer}." or layer.startswith("time_embedding."):
            in_tib.add(widths)
    tib = [(names, list(w)) for w, names in groups.items() if w in in_tib]
    rest = [(names, list(w)) for w, names in groups.items() if w not in in_tib]
    n_tib = min(len(tib), max(max_quantizers // 2, max_quantizers - len(rest)))
    chosen = _spread(tib, n_tib) + _spread(rest, max_quantizers - n_tib)
    return {names[0] + (f" (+{len(names) - 1} same)" if len(names) > 1 else ""): w for names, w in chosen}


def _temporal_layers(model: Any) -> set[str]:
    """The TIB's layer names by the model's architecture adapter; empty for a model no adapter knows."""
    try:
        from tfmq_exp.models.adapters import temporal_layer_names

        return set(temporal_layer_names(model))
    except Exception:
        return set()


def _spread(items: list[Any], k: int) -> list[Any]:
    if k <= 0 or not items:
        return []
    if k >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else [items[0]]


def write_fsc_plot(model: Any, path: Path, title: str = "FSC activation ranges per step") -> Path | None:
    """Line plot of ``step_range_widths`` (log scale) written to ``path``; None when there are no step tables."""
    widths = step_range_widths(model)
    if not widths:
        return None
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend change
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    for name, w in widths.items():
        ax.plot(range(len(w)), w, marker="." if len(w) <= 50 else None, linewidth=1.2, label=name)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("sampling step (0 = first, noisiest)")
    ax.set_ylabel("range width  scale * (2^bits - 1)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)
    return path


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------- trackers


class NullTracker:
    def log(self, data: dict[str, Any]) -> None:
        pass

    def log_results(self, results: dict[str, Any], out: Path, model: Any = None) -> None:
        pass

    def finish(self) -> None:
        pass


def _fsc_plot(model: Any, out: Path) -> Path | None:
    """fsc_ranges.png of ``model`` in ``out``; None (and no stale plot of an earlier run left) without step tables."""
    try:
        path = None if model is None else write_fsc_plot(model, out / FSC_PLOT)
        if path is None:
            (out / FSC_PLOT).unlink(missing_ok=True)
        return path
    except Exception as err:  # a plot is never worth a finished run
        log.warning("could not write %s: %s", out / FSC_PLOT, _one_line(err))
        return None


class CsvTracker:
    """logger=csv: ``metrics.csv`` (long layout ``step,name,value``: one row per number, ``step`` counting the
    log calls from 0) and ``units.csv`` (the per-unit reconstruction table) in the run folder."""

    def __init__(self, cfg: Any, config: dict[str, Any], out: Path) -> None:
        self.out = Path(out)
        self.metrics_path = self.out / "metrics.csv"
        self.step = 0
        with open(self.metrics_path, "w", newline="") as fh:
            csv.writer(fh).writerow(["step", "name", "value"])

    def log(self, data: dict[str, Any]) -> None:
        values = scalars(data)
        if not values:
            return
        with open(self.metrics_path, "a", newline="") as fh:
            w = csv.writer(fh)
            for k, v in values.items():
                w.writerow([self.step, k, v])
        self.step += 1

    def log_results(self, results: dict[str, Any], out: Path, model: Any = None) -> None:
        self.log({**(results.get("metrics") or {}), **(results.get("timings") or {}),
                  "objective": results.get("objective")})
        columns, rows = unit_table(results)
        if rows:
            tmp = self.out / "units.csv.tmp"
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(columns)
                w.writerows([["" if v is None else v for v in r] for r in rows])
            tmp.replace(self.out / "units.csv")
        else:  # a method without units (rtn, fp): no table, not an earlier run's
            (self.out / "units.csv").unlink(missing_ok=True)
        _fsc_plot(model, Path(out))

    def finish(self) -> None:
        pass


class WandbTracker:
    """logger=wandb. Run metadata: group = logger.group or the multirun's sweep folder, job_type = the task,
    tags = model, quantizer, bits + logger.tags, name = logger.run_name or quantizer-bits-seed, config = the
    resolved config plus ``hydra.overrides.task``, notes = the overrides. ``log_results`` adds the dashboard."""

    def __init__(self, cfg: Any, config: dict[str, Any], out: Path, run_id: str | None = None) -> None:
        mode, why = choose_mode(str(cfg.mode), cli_logger_mode())  # a bad mode is the user's error: it raises
        log.info("W&B mode: %s (%s)", mode, why)
        self.mode = mode
        self.run: Any = None
        overrides, sweep, job_num = hydra_context()
        self.group = _opt(cfg, "group") or sweep
        self.name = _opt(cfg, "run_name") or run_name(config, job_num)
        self.tags = run_tags(config, _opt(cfg, "tags"))
        self.job_type = _get(config, "task")
        try:
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                mode=mode,
                config={**config, "hydra": {"overrides": {"task": overrides}}},
                dir=str(out),
                group=self.group,
                job_type=self.job_type,
                name=self.name,
                tags=self.tags,
                notes=" ".join(overrides) or None,
                reinit="finish_previous",
                # a resumed job (resume=true/auto) keeps its configuration's run id: one dashboard run per job
                id=run_id,
                resume="allow" if run_id else None,
            )
            for key in LOWER_BETTER:
                self.run.define_metric(key, summary="min")
            for key in HIGHER_BETTER:
                self.run.define_metric(key, summary="max")
        except Exception as err:
            self._failed("start", err)

    def _failed(self, what: str, err: BaseException) -> None:
        log.warning("W&B: could not %s (%s); the run goes on without it", what, _one_line(err))

    def _try(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.run is None:
            return None
        try:
            return fn()
        except Exception as err:
            self._failed(what, err)
            return None

    def log(self, data: dict[str, Any]) -> None:
        values = scalars(data)
        if values:
            self._try("log metrics", lambda: self.run.log(values))

    def log_results(self, results: dict[str, Any], out: Path, model: Any = None) -> None:
        """Final metrics and timings, the per-unit table, the images and the checkpoint artifact."""
        out = Path(out)
        fsc = _fsc_plot(model, out)
        if self.run is None:
            return
        import wandb

        payload: dict[str, Any] = scalars({**(results.get("metrics") or {}), **(results.get("timings") or {}),
                                           "objective": results.get("objective")})
        columns, rows = unit_table(results)
        if rows:
            table = self._try("build the units table", lambda: wandb.Table(columns=columns, data=rows))
            if table is not None:
                payload["units"] = table
        images = {k: v for k, v in IMAGES.items() if (out / v[0]).is_file()}
        if fsc is not None:
            images["fsc_ranges"] = (FSC_PLOT, "activation range width per sampling step (FSC tables)")
        for key, (file, caption) in images.items():
            img = self._try(f"read {file}", lambda f=file, c=caption: wandb.Image(str(out / f), caption=c))
            if img is not None:
                payload[key] = img
        self._try("log the results", lambda: self.run.log(payload))
        self._try("log the checkpoint artifact", lambda: self._log_checkpoint(results, out))

    def _log_checkpoint(self, results: dict[str, Any], out: Path) -> None:
        ckpt = out / "quantized.safetensors"
        if not ckpt.is_file():
            return
        import wandb

        parts = [results.get("model"), results.get("quantizer"), results.get("bits")]
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(str(p) for p in parts if p)) or "quantized"
        meta = {k: results.get(k) for k in ("task", "model", "quantizer", "bits", "seed", "config_signature",
                                            "objective")}
        meta["metrics"] = scalars(results.get("metrics") or {})
        art = wandb.Artifact(name, type="model", description="fake-quant checkpoint (quantized.safetensors) and "
                             "its results.json; reload with task=sample ckpt=...", metadata=meta)
        art.add_file(str(ckpt), policy="immutable")  # not copied to W&B's staging area: it is never rewritten
        if (out / "results.json").is_file():
            art.add_file(str(out / "results.json"))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self._try("finish", lambda: self.run.finish())
        self.run = None


def _opt(cfg: Any, key: str) -> Any:
    """``cfg.key``, or None where the logger config lacks it (a plain object in tests, an older saved config)."""
    return getattr(cfg, key, None)


def make_tracker(cfg: Any, config: dict[str, Any], out: Path,
                 run_id: str | None = None) -> NullTracker | CsvTracker | WandbTracker:
    name = str(cfg.name)
    if name == "wandb":
        return WandbTracker(cfg, config, out, run_id)
    if name == "csv":
        return CsvTracker(cfg, config, out)
    if name == "none":
        return NullTracker()
    raise UserError(f"logger.name={name} is unknown. Fix: use logger=none, csv or wandb.")

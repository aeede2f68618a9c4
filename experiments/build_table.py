"""From a sweep to a table: mean ± std over seeds of every (model, method, bits) group of finished runs.

    python experiments/build_table.py multirun/2026-11-26_12-00-00              # Markdown on stdout
    python experiments/build_table.py multirun/main_table --latex --out table.tex
    python experiments/build_table.py multirun/ablation_fsc_scope --by quantizer.options.fsc_scope
    python experiments/build_table.py --wandb my-team/tfmq-exp                   # the runs logged with logger=wandb

Reads every ``results.json`` under the given folders (a Hydra multirun folder with its numbered job
folders, several sweeps, or a single run folder). A run counts only when it finished: its folder holds
no ``INCOMPLETE`` marker and its results.json says ``"complete": true`` (tfmq_exp/results.py). The
others are skipped and counted on stderr, with the reason (``-v`` lists them one by one).

Rows: one per (model, quantizer, bits) plus the value of every ``--by`` key, read from the run's saved
config (``.hydra/config.yaml`` beside results.json) or, failing that, from results.json itself (e.g.
``--by method_info.pool_size``). Cells: the mean over the row's seeds, ± the sample standard deviation
when there are two or more, and ``n`` the number of seeds. Rows go by model, then bits (FP first, then
higher precision first), then method (fp, rtn, brecq, qdiff, tfmq), then the ``--by`` values. The best
mean of each bits group is bold (lowest FID/sFID/KID, highest IS/accuracy/CLIP/PSNR).

Exit status 2 with one ``error:`` line when there is nothing to tabulate or the input is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INCOMPLETE = "INCOMPLETE"  # the marker file of tfmq_exp/results.py
METHOD_ORDER = ("fp", "rtn", "brecq", "qdiff", "tfmq")
METHOD_NAMES = {"fp": "FP", "rtn": "RTN", "brecq": "BRECQ", "qdiff": "Q-Diffusion", "tfmq": "TFMQ-DM"}
IGNORED_CONFIG = ("paths", "hydra", "seed")  # differ between runs without making them different settings

# reasons a run is left out (also the words of the summary line)
MARKER = "INCOMPLETE marker"
NOT_COMPLETE = 'results.json without "complete": true'
UNREADABLE = "unreadable results.json"
NOT_QUANTIZE = "not a task=quantize run"
NO_FIELDS = "results.json without model/quantizer/bits"
DUPLICATE = "duplicate seed of a row (the newest run kept)"


@dataclass(frozen=True)
class Column:
    key: str  # in results.json["metrics"], else results.json["timings"] (W&B: the run summary)
    label: str
    latex: str
    better: str | None = None  # "low", "high" or None (never bold)
    decimals: int = 2
    scale: float = 1.0


COLUMNS = {c.key: c for c in (
    Column("fid", "FID", "FID", "low"),
    Column("sfid", "sFID", "sFID", "low"),
    Column("is", "IS", "IS", "high"),
    Column("kid_mean", "KID", "KID", "low", 4),
    Column("class_accuracy", "Class acc. (%)", r"Class acc. (\%)", "high", 2, 100.0),
    Column("clip_score", "CLIP", "CLIP", "high"),
    Column("fp_psnr", "PSNR vs FP (dB)", "PSNR vs FP (dB)", "high"),
    Column("quantization_s", "Quant. time (s)", "Quant. time (s)", None, 1),
)}
DEFAULT_METRICS = ("fid", "sfid", "is", "kid_mean", "class_accuracy", "clip_score", "fp_psnr")
TIME_KEY = "quantization_s"
MISSING = object()


class TableError(Exception):
    """One line for the user: what is wrong and how to fix it (exit status 2)."""


@dataclass
class Run:
    source: str  # run folder, or the W&B run path
    model: str
    quantizer: str
    bits: str
    seed: Any
    values: dict[str, float]  # numeric metrics and timings
    config: dict[str, Any] | None  # the saved config (raw, as Hydra wrote it), if any
    results: dict[str, Any]  # results.json (W&B: the run summary)
    stamp: Any  # newer is larger: which of two duplicates is kept


@dataclass
class Skip:
    source: str
    reason: str
    detail: str = ""


@dataclass
class Collection:
    runs: list[Run] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class Row:
    model: str
    quantizer: str
    bits: str
    by: tuple[Any, ...]
    runs: list[Run]
    cells: dict[str, Stat]


@dataclass
class Stat:
    mean: float
    std: float | None  # sample std, None below two values
    k: int  # values the mean is over (fewer than the row's n where some run lacks the metric)


# ---------------------------------------------------------------------------------------------- reading


def dotted(d: Any, key: str) -> Any:
    """``d["a"]["b"]`` for ``a.b`` (also a literal ``"a.b"`` key, as a flattened W&B config has); MISSING if absent."""
    if not isinstance(d, dict):
        return MISSING
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in d:
            if i == len(parts):
                return d[head]
            found = dotted(d[head], ".".join(parts[i:]))
            if found is not MISSING:
                return found
    return MISSING


def numeric(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def load_config(folder: Path) -> dict[str, Any] | None:
    """The run's composed config as Hydra saved it (``.hydra/config.yaml``), unresolved; None if absent."""
    path = folder / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def resolve(config: dict[str, Any], key: str, value: Any) -> Any:
    """A ``${...}`` interpolation of the saved config resolved where OmegaConf can (not ``${hydra:...}``)."""
    if not (isinstance(value, str) and "${" in value):
        return value
    try:
        from omegaconf import OmegaConf

        return OmegaConf.select(OmegaConf.create(config), key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 (any resolver failure: keep the text)
        return value


def lookup(run: Run, key: str) -> Any:
    """``key`` in the run's config, else in its results.json (W&B: config, else summary); MISSING if neither."""
    if run.config is not None:
        v = dotted(run.config, key)
        if v is not MISSING:
            return resolve(run.config, key, v)
    return dotted(run.results, key)


def marker_detail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def run_folders(paths: list[Path]) -> list[Path]:
    folders: set[Path] = set()
    for p in paths:
        if not p.exists():
            raise TableError(f"{p} does not exist. Fix: pass the sweep folder, e.g. multirun/2026-11-26_12-00-00.")
        if p.is_file():
            if p.name != "results.json":
                raise TableError(f"{p} is a file. Fix: pass a run or sweep folder, or a results.json.")
            folders.add(p.parent)
            continue
        for name in ("results.json", INCOMPLETE):
            folders.update(f.parent for f in p.rglob(name) if f.is_file())
    return sorted(folders)


def read_folder(folder: Path) -> Run | Skip:
    src = str(folder)
    res_file = folder / "results.json"
    if (folder / INCOMPLETE).is_file():
        return Skip(src, MARKER, marker_detail(folder / INCOMPLETE))
    try:
        results = json.loads(res_file.read_text())
    except (OSError, ValueError) as err:
        return Skip(src, UNREADABLE, str(err))
    if not isinstance(results, dict):
        return Skip(src, UNREADABLE, "not a JSON object")
    if results.get("complete") is not True:
        return Skip(src, NOT_COMPLETE)
    if results.get("task", "quantize") != "quantize":
        return Skip(src, NOT_QUANTIZE, f"task={results.get('task')}")
    if not all(results.get(k) for k in ("model", "quantizer", "bits")):
        return Skip(src, NO_FIELDS)
    values: dict[str, float] = {}
    for part in ("timings", "metrics"):  # a metric wins over a timing of the same name
        for k, v in (results.get(part) or {}).items():
            if numeric(v) is not None:
                values[k] = numeric(v)
    return Run(src, str(results["model"]), str(results["quantizer"]), str(results["bits"]), results.get("seed"),
               values, load_config(folder), results, res_file.stat().st_mtime)


def collect_folders(paths: list[Path]) -> Collection:
    out = Collection()
    for folder in run_folders(paths):
        item = read_folder(folder)
        (out.runs if isinstance(item, Run) else out.skipped).append(item)
    return out


def wandb_bits(config: dict[str, Any]) -> str:
    """The label results.json has (tasks/common.py bits_label), from the logged config."""
    if dotted(config, "quantizer.name") == "fp":
        return "fp"
    w, a = dotted(config, "quantizer.weight.n_bits"), dotted(config, "quantizer.act.n_bits")
    if w is MISSING or a is MISSING:
        return ""
    return "fp" if int(w) >= 32 and int(a) >= 32 else f"w{int(w)}a{int(a)}"


def run_summary(run: Any) -> dict[str, Any]:
    summary = getattr(run, "summary_metrics", None)
    if isinstance(summary, dict):
        return summary
    s = run.summary
    raw = getattr(s, "_json_dict", None)
    return dict(raw) if isinstance(raw, dict) else {k: s[k] for k in s.keys()}


def collect_wandb(path: str, api: Any = None) -> Collection:
    """The runs of ENTITY/PROJECT through the public API: config as logged (the resolved run config), metrics
    and timings from the run summary (tracker.log of tasks/quantize.py). A run counts when its state is
    ``finished``."""
    if api is None:
        import wandb

        api = wandb.Api(timeout=60)
    out = Collection()
    for run in api.runs(path):
        src = f"wandb:{'/'.join(run.path) if isinstance(run.path, (list, tuple)) else run.path}"
        state = str(getattr(run, "state", "unknown"))
        if state != "finished":
            out.skipped.append(Skip(src, f"W&B state {state}"))
            continue
        config = dict(run.config)
        summary = run_summary(run)
        if dotted(config, "task") not in (MISSING, "quantize"):
            out.skipped.append(Skip(src, NOT_QUANTIZE, f"task={dotted(config, 'task')}"))
            continue
        model, quantizer, bits = dotted(config, "model.name"), dotted(config, "quantizer.name"), wandb_bits(config)
        if model is MISSING or quantizer is MISSING or not bits:
            out.skipped.append(Skip(src, "W&B config without model.name/quantizer.name/bits"))
            continue
        seed = dotted(config, "seed")
        # metrics with a best-value summary (define_metric summary="min"/"max") are stored as {"min": v}
        flat = {k: (v.get("min", v.get("max", v.get("last"))) if isinstance(v, dict) else v)
                for k, v in summary.items()}
        values = {k: numeric(v) for k, v in flat.items() if not k.startswith("_") and numeric(v) is not None}
        out.runs.append(Run(src, str(model), str(quantizer), bits, None if seed is MISSING else seed, values, config,
                            summary, str(getattr(run, "created_at", ""))))
    return out


# ---------------------------------------------------------------------------------------------- grouping


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between ``runs`` (paths, hydra and seed left out)."""
    flats = [flat(r.config) for r in runs if r.config is not None]
    if len(flats) < 2:
        return []
    keys = set().union(*flats)
    return sorted(k for k in keys if k.split(".")[0] not in IGNORED_CONFIG
                  and len({json.dumps(f.get(k, "<absent>"), sort_keys=True, default=str) for f in flats}) > 1)


def dedupe(runs: list[Run], by: list[str]) -> tuple[list[Run], list[Skip], list[str]]:
    """One run per (row, seed): the newest; the others come back skipped, with the config keys they differ in."""
    seen: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        seen[(*row_key(r, by), json.dumps(r.seed, default=str))].append(r)
    kept, skipped, differ = [], [], set()
    for same in seen.values():
        same.sort(key=lambda r: r.stamp)
        kept.append(same[-1])
        if len(same) > 1:
            skipped += [Skip(r.source, DUPLICATE, f"kept {same[-1].source}") for r in same[:-1]]
            differ.update(differing_keys(same))
    return kept, skipped, sorted(differ)


def by_value(run: Run, key: str) -> Any:
    v = lookup(run, key)
    return None if v is MISSING else v


def row_key(run: Run, by: list[str]) -> tuple:
    return (run.model, run.quantizer, run.bits, *(json.dumps(by_value(run, k), default=str) for k in by))


def bits_rank(bits: str) -> tuple:
    if bits == "fp":
        return (0,)
    m = re.fullmatch(r"w(\d+)a(\d+)", bits)
    return (1, -int(m.group(1)), -int(m.group(2))) if m else (2, bits)


def method_rank(q: str) -> tuple:
    return (METHOD_ORDER.index(q), "") if q in METHOD_ORDER else (len(METHOD_ORDER), q)


def value_rank(v: Any) -> tuple:
    if v is None:
        return (2, 0.0, "")
    n = numeric(v)
    return (0, n, "") if n is not None else (1, 0.0, str(v))


def seed_rank(s: Any) -> tuple:
    return value_rank(s)


def stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) >= 2 else None, len(values))


def build_rows(runs: list[Run], by: list[str], columns: list[Column]) -> list[Row]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[row_key(r, by)].append(r)
    rows = []
    for members in groups.values():
        members.sort(key=lambda r: seed_rank(r.seed))
        first = members[0]
        cells = {}
        for c in columns:
            s = stat([r.values[c.key] for r in members if c.key in r.values])
            if s is not None:
                cells[c.key] = s
        rows.append(Row(first.model, first.quantizer, first.bits, tuple(by_value(first, k) for k in by), members,
                        cells))
    rows.sort(key=lambda r: (r.model, bits_rank(r.bits), method_rank(r.quantizer), *map(value_rank, r.by)))
    return rows


def choose_columns(runs: list[Run], metrics: list[str] | None, with_time: bool) -> list[Column]:
    have = set().union(*(r.values for r in runs)) if runs else set()
    if metrics:
        absent = [m for m in metrics if m not in have]
        if absent:
            found = ", ".join(sorted(have)) or "none"
            raise TableError(f"--metrics {' '.join(absent)}: no complete run has it. Fix: pick from {found}.")
        keys = list(metrics)
    else:
        keys = [m for m in DEFAULT_METRICS if m in have]
    if with_time and TIME_KEY in have and TIME_KEY not in keys:
        keys.append(TIME_KEY)
    if not keys:
        raise TableError("the complete runs have none of the default metrics. Fix: name some with --metrics KEY.")
    return [COLUMNS.get(k, Column(k, k, latex_escape(k), None, 4)) for k in keys]


# ---------------------------------------------------------------------------------------------- output


def latex_escape(s: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(repl.get(ch, ch) for ch in s)


def bits_name(bits: str) -> str:
    return "W32A32" if bits == "fp" else bits.upper()


def method_name(q: str) -> str:
    return METHOD_NAMES.get(q, q)


def value_text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def by_label(key: str, all_keys: list[str]) -> str:
    """The last part of the key, or the whole key where two ``--by`` keys end alike."""
    last = key.split(".")[-1]
    return last if sum(k.split(".")[-1] == last for k in all_keys) == 1 else key


def best_cells(rows: list[Row], columns: list[Column]) -> set[tuple[int, str]]:
    """(row index, column key) of the best mean of each (model, bits) group, compared as printed; ties all bold.
    A group needs two rows with the metric for anything to be bold."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[(r.model, r.bits)].append(i)
    best = set()
    for members in groups.values():
        for c in columns:
            if c.better is None:
                continue
            shown = {i: round(rows[i].cells[c.key].mean * c.scale, c.decimals)
                     for i in members if c.key in rows[i].cells}
            if len(shown) < 2:
                continue
            target = min(shown.values()) if c.better == "low" else max(shown.values())
            best.update((i, c.key) for i, v in shown.items() if v == target)
    return best


def cell_text(row: Row, c: Column, bold: bool, tex: bool) -> str:
    s = row.cells.get(c.key)
    if s is None:
        return "-"
    mean = f"{s.mean * c.scale:.{c.decimals}f}"
    if bold:
        mean = rf"\textbf{{{mean}}}" if tex else f"**{mean}**"
    text = mean
    if s.std is not None:
        std = f"{s.std * c.scale:.{c.decimals}f}"
        text += rf" $\pm$ {std}" if tex else f" ± {std}"
    if s.k < len(row.runs):
        text += r"$^\dagger$" if tex else "†"
    return text


def header(columns: list[Column], by: list[str], multi_model: bool, tex: bool) -> list[str]:
    arrow = {"low": (r" $\downarrow$" if tex else " ↓"), "high": (r" $\uparrow$" if tex else " ↑"), None: ""}
    esc = latex_escape if tex else (lambda s: s)
    return (["Model"] if multi_model else []) + ["Bits", "Method"] + [esc(by_label(k, by)) for k in by] + \
        ["$n$" if tex else "n"] + [(c.latex if tex else c.label) + arrow[c.better] for c in columns]


def notes(rows: list[Row], multi_model: bool) -> list[str]:
    out = ["Mean ± sample std over the n seeds of each row (± only where n >= 2); bold: best of each bits group."]
    if any(s.k < len(r.runs) for r in rows for s in r.cells.values()):
        out.append("†: over fewer seeds than n (some runs lack the metric).")
    if not multi_model:
        out.append(f"Model: {rows[0].model}.")
    return out


def markdown(rows: list[Row], columns: list[Column], by: list[str]) -> str:
    multi = len({r.model for r in rows}) > 1
    head = header(columns, by, multi, tex=False)
    n_text = (1 if multi else 0) + 2 + len(by)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * n_text + "---:|" * (len(head) - n_text)]
    best = best_cells(rows, columns)
    for i, r in enumerate(rows):
        cells = ([r.model] if multi else []) + [bits_name(r.bits), method_name(r.quantizer)] + \
            [value_text(v) for v in r.by] + [str(len(r.runs))] + \
            [cell_text(r, c, (i, c.key) in best, tex=False) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + " ".join(notes(rows, multi)) + "\n"


def latex(rows: list[Row], columns: list[Column], by: list[str]) -> str:
    """A booktabs tabular: the bits (and model) named on the first row of their group, a rule between groups."""
    multi = len({r.model for r in rows}) > 1
    head = header(columns, by, multi, tex=True)
    n_text = (1 if multi else 0) + 2 + len(by)
    lines = [f"% {n}" for n in notes(rows, multi)]
    lines += [r"\begin{tabular}{" + "l" * n_text + "r" * (len(head) - n_text) + "}", r"\toprule",
              " & ".join(head) + r" \\", r"\midrule"]
    best = best_cells(rows, columns)
    for i, r in enumerate(rows):
        prev = rows[i - 1] if i else None
        if prev is not None and (prev.model, prev.bits) != (r.model, r.bits):
            lines.append(r"\midrule")
        new_model = prev is None or prev.model != r.model
        new_bits = new_model or prev.bits != r.bits
        cells = ([latex_escape(r.model) if new_model else ""] if multi else []) + \
            [bits_name(r.bits) if new_bits else "", latex_escape(method_name(r.quantizer))] + \
            [latex_escape(value_text(v)) for v in r.by] + [str(len(r.runs))] + \
            [cell_text(r, c, (i, c.key) in best, tex=True) for c in columns]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def skip_text(skipped: list[Skip]) -> str:
    """``skipped 3: 2 INCOMPLETE marker, 1 results.json without "complete": true``."""
    counts = sorted(Counter(s.reason for s in skipped).items(), key=lambda x: (-x[1], x[0]))
    return f"skipped {len(skipped)}" + (": " + ", ".join(f"{n} {reason}" for reason, n in counts) if counts else "")


def summary_line(n_runs: int, n_rows: int, skipped: list[Skip], differ: list[str]) -> str:
    text = f"{n_runs} complete run(s) in {n_rows} row(s); {skip_text(skipped)}"
    if differ:
        shown = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
        text += f" (duplicates differ in {shown}: add --by {differ[0]} to make them rows)"
    return text


def one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:6]))
    ap.add_argument("folders", nargs="*", type=Path, help="sweep or run folders, searched recursively for results.json")
    ap.add_argument("--by", action="append", default=[], metavar="KEY",
                    help="an extra grouping key from the saved config (else results.json), e.g. "
                         "quantizer.options.fsc_scope; repeat it for several")
    ap.add_argument("--metrics", nargs="+", metavar="KEY",
                    help=f"metric keys in results.json (default: those of {' '.join(DEFAULT_METRICS)} present)")
    ap.add_argument("--no-time", action="store_true", help=f"leave out the {TIME_KEY} column")
    ap.add_argument("--latex", action="store_true", help="a booktabs LaTeX tabular instead of Markdown")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B (online) instead of, or besides, "
                    "folders")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every skipped run and why")
    args = ap.parse_args(argv)
    if not args.folders and not args.wandb:
        ap.error("give one or more sweep folders, or --wandb ENTITY/PROJECT")
    try:
        found = collect_folders(args.folders) if args.folders else Collection()
        if args.wandb:
            try:
                online = collect_wandb(args.wandb)
            except Exception as err:  # noqa: BLE001 (import, network, auth, bad path: one line for all)
                raise TableError(f"cannot read the W&B runs of {args.wandb}: {one_line(err)}. Fix: check "
                                 "ENTITY/PROJECT, that this machine is online and that `wandb login` (or "
                                 "WANDB_API_KEY) is set.") from err
            found.runs += online.runs
            found.skipped += online.skipped
        where = " ".join(map(str, args.folders)) + (f" W&B {args.wandb}" if args.wandb else "")
        if not found.runs:
            raise TableError(f"no complete runs in {where.strip()} ({skip_text(found.skipped)}). "
                             "Fix: let the sweep finish, or rerun its failed jobs.")
        for key in args.by:
            if all(lookup(r, key) is MISSING for r in found.runs):
                raise TableError(f"--by {key}: no run has it in its config (.hydra/config.yaml) or results.json. "
                                 "Fix: use a dotted config key such as quantizer.options.fsc_scope or recon.pool_size.")
        runs, dup, differ = dedupe(found.runs, args.by)
        skipped = found.skipped + dup
        columns = choose_columns(runs, args.metrics, not args.no_time)
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = build_rows(runs, args.by, columns)
    text = latex(rows, columns, args.by) if args.latex else markdown(rows, columns, args.by)
    print(summary_line(len(runs), len(rows), skipped, differ), file=sys.stderr)
    if args.verbose:
        for s in skipped:
            print(f"  skipped {s.source}: {s.reason}{f' ({s.detail})' if s.detail else ''}", file=sys.stderr)
    sys.stdout.write(text)
    if args.out:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        except OSError as err:
            print(f"error: cannot write {args.out}: {err.strerror}. Fix: choose a writable --out.", file=sys.stderr)
            return 2
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

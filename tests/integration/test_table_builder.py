"""experiments/build_table.py: from Hydra multirun folders of results.json to the mean ± std table.

Fake but realistic run folders (results.json as tasks/quantize.py writes it, .hydra/config.yaml as Hydra
saves it, INCOMPLETE markers as tfmq_exp/results.py leaves them); every number below is worked out by hand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "build_table.py"
SWEEPS = ROOT / "experiments" / "sweeps"


bt = load_script(SCRIPT, "build_table_under_test")


def write_run(folder: Path, quantizer: str, bits: str, seed: int, metrics: dict, quant_s: float, *,
              model: str = "mnist", complete: bool = True, marker: bool = False, options: dict | None = None,
              method_info: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    results = {
        "task": "quantize", "model": model, "quantizer": quantizer, "bits": bits, "seed": seed,
        "config_signature": "0123456789abcdef", "sampler": {"kind": "ddim", "steps": 50},
        "timings": {"calib_data_s": 0.003, "quantization_s": quant_s, "sampling_s": 60.0, "evaluation_s": 40.0},
        # as the evaluator writes them: numbers, and strings that are no metric of the table
        "metrics": {"fp_mse": 0.001, "evaluator": "default", "n_samples": 500, "reference": "mnist-5000",
                    "is": "unavailable: no logits in the fid-helper weights", **metrics},
        "objective": metrics.get("fid"), "checkpoint": None, "method_info": method_info or {},
    }
    if complete:
        results["complete"] = True
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    w, a = (32, 32) if bits == "fp" else map(int, re.fullmatch(r"w(\d+)a(\d+)", bits).groups())
    config = {"model": {"name": model}, "quantizer": {"name": quantizer, "weight": {"n_bits": w}, "act": {"n_bits": a},
                                                     "options": options or {}},
              "recon": {"pool_size": 1024}, "seed": seed, "task": "quantize",
              "paths": {"output_dir": "${hydra:runtime.output_dir}", "cache_dir": "/tmp/cache"}}
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"quantizer={quantizer}", f"seed={seed}"]))
    if marker:
        (folder / "INCOMPLETE").write_text("task=quantize started 2026-11-26 12:00:00 and has not finished: do not "
                                           "use these results.\nstopped: interrupted during sampling\n")
    return folder


def failed_job(folder: Path) -> None:
    """A job that stopped before results.json: only the marker (and Hydra's files) are there."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / "INCOMPLETE").write_text("task=quantize started 2026-11-26 12:30:00 and has not finished: do not use "
                                       "these results.\nstopped: quantizer.options.calib_steps must be > 0\n")


@pytest.fixture
def sweeps(tmp_path) -> tuple[Path, Path]:
    """An FP sweep and a methods x bits x seeds sweep, shaped like Hydra's multirun folders."""
    fp = tmp_path / "multirun" / "2026-11-26" / "11-00-00"
    for s in range(3):
        write_run(fp / str(s), "fp", "fp", s, {"fid": 8.0, "kid_mean": 0.0005, "fp_psnr": 100.0}, 0.0)
    main = tmp_path / "multirun" / "2026-11-26" / "12-00-00"
    jobs = [
        ("tfmq", "w4a8", 0, {"fid": 10.0, "kid_mean": 0.001, "fp_psnr": 30.0}, 100.0, {}),
        ("tfmq", "w4a8", 1, {"fid": 12.0, "kid_mean": 0.002, "fp_psnr": 31.0}, 110.0, {}),
        ("tfmq", "w4a8", 2, {"fid": 14.0, "kid_mean": 0.003, "fp_psnr": 32.0}, 120.0, {}),
        ("qdiff", "w4a8", 0, {"fid": 20.0, "kid_mean": 0.004, "fp_psnr": 33.0}, 200.0, {}),
        ("qdiff", "w4a8", 1, {"fid": 21.0, "kid_mean": 0.005, "fp_psnr": 33.0}, 200.0, {}),
        ("qdiff", "w4a8", 2, {"fid": 25.0, "kid_mean": 0.009, "fp_psnr": 33.0}, 200.0, {}),
        ("rtn", "w4a8", 0, {"fid": 50.0, "kid_mean": 0.05, "fp_psnr": 12.0}, 10.0, {}),
        ("rtn", "w4a8", 1, {"fid": 54.0, "kid_mean": 0.07, "fp_psnr": 14.0}, 12.0, {}),
        ("rtn", "w4a8", 2, {"fid": 999.0, "kid_mean": 0.9, "fp_psnr": 1.0}, 1.0, {"marker": True}),  # interrupted
        ("tfmq", "w8a8", 0, {"fid": 9.5, "kid_mean": 0.0008, "fp_psnr": 40.0}, 90.0, {}),
        ("qdiff", "w8a8", 0, {"fid": 1.0, "kid_mean": 0.0001, "fp_psnr": 99.0}, 1.0, {"complete": False}),  # old
        ("qdiff", "w8a8", 1, {"fid": 9.0, "kid_mean": 0.0009, "fp_psnr": 41.0}, 180.0, {}),
    ]
    for i, (q, bits, seed, metrics, t, kw) in enumerate(jobs):
        write_run(main / str(i), q, bits, seed, metrics, t, **kw)
    failed_job(main / str(len(jobs)))
    (main / "multirun.yaml").write_text("hydra: {}\n")
    return fp, main


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = bt.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_markdown_means_stds_order_and_skips(sweeps, capsys):
    code, out, err = run_main(capsys, *sweeps)
    assert code == 0
    assert err.splitlines()[0] == ('13 complete run(s) in 6 row(s); skipped 3: 2 INCOMPLETE marker, '
                                   '1 results.json without "complete": true')
    lines = out.splitlines()
    # IS is a string in every run: no column; the columns are the default metrics present, then the time
    assert lines[0] == "| Bits | Method | n | FID ↓ | KID ↓ | PSNR vs FP (dB) ↑ | Quant. time (s) |"
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|"
    assert lines[2:8] == [
        "| W32A32 | FP | 3 | 8.00 ± 0.00 | 0.0005 ± 0.0000 | 100.00 ± 0.00 | 0.0 ± 0.0 |",
        # seed 1 only (seed 0's results.json lacks "complete"): no ±; best FID 9.00 < 9.50, PSNR 41 > 40,
        # but TFMQ-DM's KID 0.0008 < 0.0009
        "| W8A8 | Q-Diffusion | 1 | **9.00** | 0.0009 | **41.00** | 180.0 |",
        "| W8A8 | TFMQ-DM | 1 | 9.50 | **0.0008** | 40.00 | 90.0 |",
        # seeds 0, 1 (seed 2 interrupted): mean 52, sample std sqrt(((50-52)^2 + (54-52)^2) / 1) = sqrt(8) = 2.83
        "| W4A8 | RTN | 2 | 52.00 ± 2.83 | 0.0600 ± 0.0141 | 13.00 ± 1.41 | 11.0 ± 1.4 |",
        # 20, 21, 25: mean 22, std sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.6458; KID the same / 1000
        "| W4A8 | Q-Diffusion | 3 | 22.00 ± 2.65 | 0.0060 ± 0.0026 | **33.00** ± 0.00 | 200.0 ± 0.0 |",
        # 10, 12, 14: mean 12, std 2
        "| W4A8 | TFMQ-DM | 3 | **12.00** ± 2.00 | **0.0020** ± 0.0010 | 31.00 ± 1.00 | 110.0 ± 10.0 |",
    ]
    assert lines[8] == ""
    assert lines[9].startswith("Mean ± sample std over the n seeds") and lines[9].endswith("Model: mnist.")
    assert len(lines) == 10


def test_verbose_names_each_skipped_run_and_why(sweeps, capsys):
    code, _, err = run_main(capsys, sweeps[1], "-v")
    assert code == 0
    listed = sorted(ln.strip() for ln in err.splitlines()[1:])
    main = sweeps[1]
    assert listed == [
        f"skipped {main / '10'}: results.json without \"complete\": true",
        f"skipped {main / '12'}: INCOMPLETE marker (stopped: quantizer.options.calib_steps must be > 0)",
        f"skipped {main / '8'}: INCOMPLETE marker (stopped: interrupted during sampling)",
    ]


def test_latex_booktabs_with_bold_best_per_bits_group(sweeps, capsys, tmp_path):
    out_file = tmp_path / "tables" / "main.tex"
    code, out, _ = run_main(capsys, *sweeps, "--latex", "--out", out_file)
    assert code == 0
    assert out_file.read_text() == out
    body = out.splitlines()
    start = body.index(r"\begin{tabular}{llrrrrr}")
    assert all(ln.startswith("% ") for ln in body[:start])
    assert body[start:] == [
        r"\begin{tabular}{llrrrrr}",
        r"\toprule",
        r"Bits & Method & $n$ & FID $\downarrow$ & KID $\downarrow$ & PSNR vs FP (dB) $\uparrow$ & Quant. time (s) \\",
        r"\midrule",
        r"W32A32 & FP & 3 & 8.00 $\pm$ 0.00 & 0.0005 $\pm$ 0.0000 & 100.00 $\pm$ 0.00 & 0.0 $\pm$ 0.0 \\",
        r"\midrule",
        r"W8A8 & Q-Diffusion & 1 & \textbf{9.00} & 0.0009 & \textbf{41.00} & 180.0 \\",
        r" & TFMQ-DM & 1 & 9.50 & \textbf{0.0008} & 40.00 & 90.0 \\",
        r"\midrule",
        r"W4A8 & RTN & 2 & 52.00 $\pm$ 2.83 & 0.0600 $\pm$ 0.0141 & 13.00 $\pm$ 1.41 & 11.0 $\pm$ 1.4 \\",
        r" & Q-Diffusion & 3 & 22.00 $\pm$ 2.65 & 0.0060 $\pm$ 0.0026 & \textbf{33.00} $\pm$ 0.00 & 200.0 $\pm$ 0.0 \\",
        r" & TFMQ-DM & 3 & \textbf{12.00} $\pm$ 2.00 & \textbf{0.0020} $\pm$ 0.0010 & 31.00 $\pm$ 1.00 & "
        r"110.0 $\pm$ 10.0 \\",
        r"\bottomrule",
        r"\end{tabular}",
    ]


def test_chosen_metrics_and_no_time(sweeps, capsys):
    code, out, _ = run_main(capsys, sweeps[1], "--metrics", "fp_mse", "fid", "--no-time")
    assert code == 0
    assert out.splitlines()[0] == "| Bits | Method | n | fp_mse | FID ↓ |"
    assert out.splitlines()[2] == "| W8A8 | Q-Diffusion | 1 | 0.0010 | **9.00** |"
    code, _, err = run_main(capsys, sweeps[1], "--metrics", "clip_score")
    assert code == 2
    assert err.startswith("error: --metrics clip_score: no complete run has it. Fix: pick from ")
    assert len(err.splitlines()) == 1


@pytest.fixture
def fsc_sweep(tmp_path) -> Path:
    """An ablation sweep over quantizer.options.fsc_scope: the setting lives only in the saved config."""
    sweep = tmp_path / "multirun" / "ablation_fsc_scope" / "2026-11-26_13-00-00" / "runs"
    fids = {("all", 0): 10.0, ("all", 1): 12.0, ("tib", 0): 14.0, ("tib", 1): 18.0}
    for i, ((scope, seed), fid) in enumerate(sorted(fids.items(), key=lambda kv: (kv[0][1], kv[0][0]))):
        write_run(sweep / str(i), "tfmq", "w4a8", seed, {"fid": fid}, 100.0 + i,
                  options={"fsc_scope": scope, "calib_steps": 16}, method_info={"pool_size": 1088 if scope == "all"
                                                                                  else 1024})
        os.utime(sweep / str(i) / "results.json", (1_000_000 + i, 1_000_000 + i))
    return sweep


def test_by_groups_on_a_saved_config_key(fsc_sweep, capsys):
    code, out, err = run_main(capsys, fsc_sweep, "--by", "quantizer.options.fsc_scope")
    assert code == 0
    assert err.splitlines()[0] == "4 complete run(s) in 2 row(s); skipped 0"
    assert out.splitlines()[:4] == [
        "| Bits | Method | fsc_scope | n | FID ↓ | Quant. time (s) |",
        "|---|---|---|---:|---:|---:|",
        # all: 10, 12 -> 11 ± sqrt(2) = 1.41; jobs 0 and 2 took 100 and 102 s
        "| W4A8 | TFMQ-DM | all | 2 | **11.00** ± 1.41 | 101.0 ± 1.4 |",
        # tib: 14, 18 -> 16 ± sqrt(8) = 2.83
        "| W4A8 | TFMQ-DM | tib | 2 | 16.00 ± 2.83 | 102.0 ± 1.4 |",
    ]
    # a key results.json has (not the config): the pool the run really used
    code, out, _ = run_main(capsys, fsc_sweep, "--by", "method_info.pool_size", "--metrics", "fid", "--no-time")
    assert code == 0
    assert out.splitlines()[2:4] == ["| W4A8 | TFMQ-DM | 1024 | 2 | 16.00 ± 2.83 |",
                                     "| W4A8 | TFMQ-DM | 1088 | 2 | **11.00** ± 1.41 |"]


def test_without_by_the_duplicates_are_skipped_and_the_differing_key_named(fsc_sweep, capsys):
    code, out, err = run_main(capsys, fsc_sweep)
    assert code == 0
    # one run per seed is kept, the newest: jobs 1 and 3 (tib, seeds 0 and 1) were written last
    assert err.splitlines()[0] == ("2 complete run(s) in 1 row(s); skipped 2: 2 duplicate seed of a row (the newest "
                                   "run kept) (duplicates differ in quantizer.options.fsc_scope: add --by "
                                   "quantizer.options.fsc_scope to make them rows)")
    assert "| W4A8 | TFMQ-DM | 2 | 16.00 ± 2.83 |" in out


def test_by_a_key_no_run_has_is_one_error_line(fsc_sweep, capsys):
    code, out, err = run_main(capsys, fsc_sweep, "--by", "quantizer.options.fsc_scop")
    assert code == 2 and out == ""
    assert err.splitlines() == ["error: --by quantizer.options.fsc_scop: no run has it in its config "
                                "(.hydra/config.yaml) or results.json. Fix: use a dotted config key such as "
                                "quantizer.options.fsc_scope or recon.pool_size."]


def test_several_models_get_a_model_column(tmp_path, capsys):
    write_run(tmp_path / "a" / "0", "tfmq", "w4a8", 0, {"fid": 5.0}, 1.0, model="mnist_ldm")
    write_run(tmp_path / "a" / "1", "rtn", "w4a8", 0, {"fid": 7.0}, 1.0, model="mnist")
    code, out, _ = run_main(capsys, tmp_path, "--no-time")
    assert code == 0
    assert out.splitlines()[:4] == ["| Model | Bits | Method | n | FID ↓ |", "|---|---|---|---:|---:|",
                                    "| mnist | W4A8 | RTN | 1 | 7.00 |", "| mnist_ldm | W4A8 | TFMQ-DM | 1 | 5.00 |"]


def test_no_complete_run_exits_2_with_one_line(tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-26" / "14-00-00"
    write_run(sweep / "0", "tfmq", "w4a8", 0, {"fid": 10.0}, 100.0, complete=False)
    failed_job(sweep / "1")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "multirun")], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: no complete runs in {tmp_path / 'multirun'} (skipped 2: 1 INCOMPLETE marker, 1 results.json without "
        '"complete": true). Fix: let the sweep finish, or rerun its failed jobs.']


def test_missing_folder_exits_2(tmp_path, capsys):
    code, _, err = run_main(capsys, tmp_path / "nope")
    assert code == 2
    assert err == f"error: {tmp_path / 'nope'} does not exist. Fix: pass the sweep folder, e.g. " \
                  "multirun/2026-11-26_12-00-00.\n"


def fake_wandb_run(name: str, state: str, quantizer: str, w: int, a: int, seed: int, summary: dict) -> SimpleNamespace:
    config = {"task": "quantize", "seed": seed, "model": {"name": "mnist"},
              "quantizer": {"name": quantizer, "weight": {"n_bits": w}, "act": {"n_bits": a},
                            "options": {"fsc_scope": "all"}}}
    return SimpleNamespace(path=["team", "tfmq-exp", name], state=state, config=config,
                           summary_metrics={"_step": 0, "_runtime": 3.0, **summary},
                           created_at=f"2026-11-26T12:0{name}")


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.asked = None

    def runs(self, path):
        self.asked = path
        return self._runs


def test_wandb_runs_group_like_folders():
    api = FakeApi([
        fake_wandb_run("1", "finished", "tfmq", 4, 8, 0, {"fid": 10.0, "quantization_s": 100.0}),
        # a best-value summary (the tracker's define_metric summary="min") comes back as {"min": v}
        fake_wandb_run("2", "finished", "tfmq", 4, 8, 1, {"fid": {"min": 14.0}, "quantization_s": 120.0}),
        fake_wandb_run("3", "crashed", "tfmq", 4, 8, 2, {"fid": 99.0}),
        fake_wandb_run("4", "finished", "fp", 4, 8, 0, {"fid": 8.0, "quantization_s": 0.0}),
    ])
    found = bt.collect_wandb("team/tfmq-exp", api=api)
    assert api.asked == "team/tfmq-exp"
    assert [(s.source, s.reason) for s in found.skipped] == [("wandb:team/tfmq-exp/3", "W&B state crashed")]
    columns = bt.choose_columns(found.runs, None, True)
    rows = bt.build_rows(found.runs, ["quantizer.options.fsc_scope"], columns)
    assert [(r.quantizer, r.bits, r.by, len(r.runs)) for r in rows] == [("fp", "fp", ("all",), 1),
                                                                      ("tfmq", "w4a8", ("all",), 2)]
    assert rows[1].cells["fid"].mean == pytest.approx(12.0) and rows[1].cells["fid"].std == pytest.approx(2 ** 1.5)
    assert "_runtime" not in rows[1].runs[0].values


def test_wandb_failure_is_one_line_exit_2(monkeypatch, capsys):
    def refuse(*_a, **_k):
        raise RuntimeError("Could not reach api.wandb.ai:\n  connection refused")

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(Api=refuse))
    code, out, err = run_main(capsys, "--wandb", "team/tfmq-exp")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "error: cannot read the W&B runs of team/tfmq-exp: RuntimeError: Could not reach api.wandb.ai: connection "
        "refused. Fix: check ENTITY/PROJECT, that this machine is online and that `wandb login` (or WANDB_API_KEY) "
        "is set."]


# ------------------------------------------------------------------------------ the sweep scripts


def dry_run(script: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    env.pop("EXTRA", None)
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)


SCRIPTS = sorted(p.name for p in SWEEPS.glob("*.sh") if p.name != "common.sh")


def test_every_ablation_of_the_issue_has_a_script():
    assert set(SCRIPTS) == {"main_table.sh", "ablation_tiar.sh", "ablation_fsc_scope.sh", "ablation_pool_size.sh",
                            "ablation_interval.sh", "ablation_bits.sh"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_sweep_script_overrides_compose_and_end_with_the_table(name, tmp_path, make_cfg):
    from omegaconf import OmegaConf

    from tfmq_exp.config import validate_config

    proc = dry_run(SWEEPS / name, tmp_path)
    if name == "ablation_tiar.sh" and "tiar" not in (ROOT / "conf" / "quantizer" / "tfmq.yaml").read_text():
        assert proc.returncode == 1 and "needs a switch" in proc.stderr and proc.stdout == ""
        return
    assert proc.returncode == 0, proc.stderr
    cmds = [ln[2:].split() for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
    sweeps = [c for c in cmds if c[1:4] == ["-m", "tfmq_exp", "-m"]]
    tables = [c for c in cmds if c[1].endswith("build_table.py")]
    assert sweeps and len(tables) == 2 and cmds[-2:] == tables and "--latex" in tables[1]
    for cmd in sweeps:
        overrides = [o for o in cmd[4:] if not o.startswith("hydra.")]
        swept = {o.split("=", 1)[0]: o.split("=", 1)[1].split(",") for o in overrides}
        for key, values in swept.items():  # every value of each swept key, the others at their first value
            for v in values:
                chosen = [f"{k}={v if k == key else vs[0]}" for k, vs in swept.items()]
                validate_config(make_cfg(*chosen), with_paths=False)
        saved = OmegaConf.to_container(make_cfg(*[f"{k}={vs[0]}" for k, vs in swept.items()]), resolve=False)
        for by in tables[0][tables[0].index("--by") + 1:-2] if "--by" in tables[0] else []:
            assert bt.dotted(saved, by) is not bt.MISSING, by  # the key the table groups on is in the saved config

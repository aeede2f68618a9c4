"""Issue 12 item 1: logger=wandb fills an ablation dashboard, logger=csv writes the same numbers locally.

The W&B runs are real offline runs (no mock of wandb): everything is read back from what wandb 0.31 leaves
on disk. Offline, it writes ``files/media/`` (images, tables) but no config.yaml / wandb-summary.json: the
config, summary, run metadata (group, job_type, name, tags) and artifacts live only in the run's
``run-<id>.wandb`` transaction log, which ``wandb sync`` uploads later. That file is a LevelDB-style log: a
7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of records, each a 7-byte header (CRC32,
length as uint16, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) and a slice of a serialized ``wandb_internal.Record``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import logging
import struct
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from tfmq_exp.app import run
from tfmq_exp.config import register_configs
from tfmq_exp.errors import UserError
from tfmq_exp.quant.quantizer import UniformQuantizer
from tfmq_exp.tracking import WandbTracker, make_tracker, step_range_widths

CONF = Path(__file__).resolve().parents[2] / "conf"
# the smoke pipeline cut further: 4 sampling steps, 2 AdaRound/LSQ iterations, 8 trajectories; the evaluator
# computes no Inception metric, only the temporal diagnostics (temporal_error.png, temporal_* metrics)
TINY = ("debug=smoke", "evaluator=none", "quantizer=tfmq", "bits=w4a8", "sampler.steps=4", "recon.iters=2",
        "recon.act_iters=2", "recon.pool_size=32", "calib.n_trajectories=8", "calib.per_step=8",
        "evaluator.name=diagnostics_only", "evaluator.diagnostics=true")
UNIT_KEYS = ("unit", "kind", "stage", "loss_before", "loss_after", "wall_s")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline, quiet, and every W&B folder (runs, artifact staging, cache, settings) under tmp_path."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path,
                       "WANDB_DATA_DIR": tmp_path / "wandb_data", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "HOME": tmp_path}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------- reading a run back


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def read_offline_run(folder: Path) -> dict:
    """run metadata, config, final summary, metric definitions and artifacts of the one offline run in folder.

    W&B's service process writes the file; on a loaded machine its records can land a moment after
    ``finish()`` returns (seen in CI with another job on the cores: first the run record, later the final
    summary), so the file is read again, for up to 30 s, until it holds the run record and the exit record
    and two reads a moment apart find the same number of records."""
    last = -1
    for _ in range(60):
        out = _read_offline_run(folder)
        if "group" in out and out["exited"] and out["records"] == last:
            return out
        last = out["records"]
        time.sleep(0.5)
    return out


def _read_offline_run(folder: Path) -> dict:
    runs = sorted(folder.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    out: dict = {"dir": runs[0], "summary": {}, "metrics": {}, "artifacts": [], "exited": False, "records": 0}
    for rec in _records(next(runs[0].glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        out["records"] += 1
        out["exited"] |= kind == "exit"
        if kind == "run":
            r = rec.run
            out.update(group=r.run_group, job_type=r.job_type, name=r.display_name, tags=list(r.tags), notes=r.notes,
                       config={u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "summary":
            for u in rec.summary.update:
                path = list(u.nested_key) or [u.key]
                node = out["summary"]
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = json.loads(u.value_json)
        elif kind == "metric":
            m = rec.metric
            out["metrics"][m.name or m.glob_name] = {k for k in ("min", "max", "last") if getattr(m.summary, k)}
        elif kind == "artifact":
            a = rec.artifact
            out["artifacts"].append({"type": a.type, "name": a.name, "metadata": json.loads(a.metadata or "{}"),
                                     "files": {c.path: c for c in a.manifest.contents}})
    return out


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


# ---------------------------------------------------------------------------------------------- tests


def test_wandb_offline_run_holds_the_dashboard(make_cfg, tmp_path, offline):
    res = run(make_cfg(*TINY, "logger=wandb", "logger.mode=offline", "logger.tags=[ablation]"))
    saved = json.loads((tmp_path / "results.json").read_text())
    wb = read_offline_run(tmp_path)
    files = wb["dir"] / "files"

    # 1. config, overrides, group, job type, tags, name
    assert wb["config"]["quantizer"]["name"] == "tfmq" and wb["config"]["logger"]["name"] == "wandb"
    assert wb["config"]["sampler"]["steps"] == 4 and wb["config"]["task"] == "quantize"
    assert wb["config"]["hydra"] == {"overrides": {"task": []}}  # not under Hydra: no command line
    assert (wb["group"], wb["job_type"], wb["name"]) == ("", "quantize", "tfmq-w4a8-s0")  # group: multirun only
    assert wb["tags"] == ["mnist", "tfmq", "w4a8", "ablation"]

    # 2. summaries: lower-better metrics keep the min, higher-better the max, timings their value
    assert {"fid", "sfid", "kid_mean"} <= {k for k, v in wb["metrics"].items() if v == {"min"}}
    assert {"is", "clip_score", "class_accuracy", "fp_psnr"} <= {k for k, v in wb["metrics"].items() if v == {"max"}}
    m, s = saved["metrics"], wb["summary"]
    assert s["fp_psnr"] == {"max": pytest.approx(m["fp_psnr"])}
    assert s["fp_ssim"] == {"max": pytest.approx(m["fp_ssim"])}
    assert s["fp_mse"] == {"min": pytest.approx(m["fp_mse"])}
    assert s["objective"] == {"min": pytest.approx(res["objective"])}
    assert s["temporal_cosine_mean"] == {"max": pytest.approx(m["temporal_cosine_mean"])}
    assert set(saved["timings"]) >= {"calib_data_s", "quantization_s", "weight_stage_s", "act_stage_s", "sampling_s"}
    assert all(s[k] == pytest.approx(v) for k, v in saved["timings"].items())

    # 3. the per-unit table: one row per entry of results.json's method_info.units
    table = json.loads((files / s["units"]["path"]).read_text())
    assert table["columns"][:6] == list(UNIT_KEYS)
    units = saved["method_info"]["units"]
    assert len(table["data"]) == len(units) == s["units"]["nrows"] > 3
    for row, unit in zip(table["data"], units, strict=True):
        want = {c: unit.get(c) for c in table["columns"]}
        assert dict(zip(table["columns"], row, strict=True)) == pytest.approx(want)
    assert units[0]["kind"] == "tib" and {"weight"} <= {u["stage"] for u in units}

    # 4./5. images: the sample grid, the temporal-error plot and the FSC ranges plot, as the run folder has them
    for key, file in (("samples", "samples.png"), ("temporal_error", "temporal_error.png"),
                      ("fsc_ranges", "fsc_ranges.png")):
        img = s[key]
        assert img["_type"] == "image-file" and img["format"] == "png", key
        logged = files / img["path"]
        assert logged.is_file() and logged.parent == files / "media" / "images"
        assert logged.read_bytes() == (tmp_path / file).read_bytes(), key

    # 6. the checkpoint artifact, with results.json, in the transaction log `wandb sync` uploads
    models = [a for a in wb["artifacts"] if a["type"] == "model"]
    assert len(models) == 1 and models[0]["name"] == "mnist-tfmq-w4a8"
    art = models[0]
    assert set(art["files"]) == {"quantized.safetensors", "results.json"}
    ckpt = art["files"]["quantized.safetensors"]
    assert ckpt.size == (tmp_path / "quantized.safetensors").stat().st_size
    assert ckpt.digest == md5_b64(tmp_path / "quantized.safetensors")
    assert Path(ckpt.local_path) == tmp_path / "quantized.safetensors"  # immutable: not copied to staging
    assert art["files"]["results.json"].digest == md5_b64(tmp_path / "results.json")
    assert art["metadata"]["bits"] == "w4a8" and art["metadata"]["config_signature"] == saved["config_signature"]


def test_csv_logger_writes_metrics_and_units(make_cfg, tmp_path):
    run(make_cfg(*TINY, "logger=csv"))
    saved = json.loads((tmp_path / "results.json").read_text())
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) == {"step", "name", "value"} and {r["step"] for r in rows} == {"0"}
    logged = {r["name"]: float(r["value"]) for r in rows}
    expected = {k: v for k, v in {**saved["metrics"], **saved["timings"], "objective": saved["objective"]}.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert logged == pytest.approx(expected) and "fp_psnr" in logged and "quantization_s" in logged
    with open(tmp_path / "units.csv", newline="") as fh:
        units = list(csv.DictReader(fh))
    assert list(units[0])[:6] == list(UNIT_KEYS)
    assert [(u["unit"], u["stage"]) for u in units] == [(u["unit"], u["stage"]) for u in saved["method_info"]["units"]]
    assert [float(u["loss_after"]) for u in units] == pytest.approx(
        [u["loss_after"] for u in saved["method_info"]["units"]])
    assert (tmp_path / "fsc_ranges.png").is_file() and not (tmp_path / "wandb").exists()


def test_multirun_job_gets_the_sweep_as_group(offline, tmp_path, caplog):
    """Under Hydra's multirun: group = the sweep folder's name, name ends in the job number, overrides kept."""
    register_configs()
    overrides = ["quantizer=brecq", "seed=3", "logger=wandb", "logger.mode=offline"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"paths.output_dir={tmp_path}"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "multirun" / "ablation_fsc")
        cfg.hydra.job.num = 5
        cfg.hydra.overrides.task = overrides
    HydraConfig.instance().set_config(cfg)
    try:
        config = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                  for k in cfg if k != "hydra"}
        with caplog.at_level(logging.INFO, logger="tfmq_exp"):
            tracker = make_tracker(cfg.logger, config, tmp_path)
        tracker.finish()
    finally:
        HydraConfig.instance().cfg = None
    assert "W&B mode: offline (logger.mode on the command line)" in caplog.text
    wb = read_offline_run(tmp_path)
    assert (wb["group"], wb["name"], wb["job_type"]) == ("ablation_fsc", "brecq-w4a8-s3-j5", "quantize")
    assert wb["config"]["hydra"] == {"overrides": {"task": overrides}} and wb["notes"] == " ".join(overrides)


def test_group_and_name_options_win(make_cfg, offline, tmp_path):
    cfg = make_cfg("logger=wandb", "logger.group=fsc_scope", "logger.run_name=tfmq-tib-only", "quantizer=tfmq")
    make_tracker(cfg.logger, OmegaConf.to_container(cfg, resolve=True), tmp_path).finish()
    wb = read_offline_run(tmp_path)
    assert (wb["group"], wb["name"]) == ("fsc_scope", "tfmq-tib-only")
    assert wb["config"]["logger"]["group"] == "fsc_scope"


def test_wandb_failures_cost_a_warning_not_the_run(offline, tmp_path, monkeypatch, caplog):
    import wandb

    cfg = OmegaConf.create({"name": "wandb", "mode": "offline", "project": "p", "entity": None, "tags": []})
    results = {"metrics": {"fp_psnr": 20.0}, "timings": {"sampling_s": 1.0}, "method_info": {"units": []}}

    def refuse(*args, **kwargs):
        raise RuntimeError("no service\nsecond line")

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="tfmq_exp"):
        patch.setattr(wandb, "init", refuse)
        tracker = WandbTracker(cfg, {"task": "quantize"}, tmp_path)
        tracker.log({"a": 1.0})
        tracker.log_results(results, tmp_path)
        tracker.finish()
    assert [r.getMessage() for r in caplog.records if r.name == "tfmq_exp"] == [
        "W&B: could not start (no service second line); the run goes on without it"]
    caplog.clear()
    tracker = WandbTracker(cfg, {"task": "quantize"}, tmp_path)
    monkeypatch.setattr(tracker.run, "log", refuse)
    with caplog.at_level(logging.WARNING, logger="tfmq_exp"):
        tracker.log_results(results, tmp_path)
    tracker.finish()
    assert [r.getMessage() for r in caplog.records if r.name == "tfmq_exp"] == [
        "W&B: could not log the results (no service second line); the run goes on without it"]
    monkeypatch.setenv("WANDB_MODE", "sometimes")  # a config error still stops the run before any work
    with pytest.raises(UserError, match=r"^W&B mode 'sometimes' \(WANDB_MODE is set\) is not one of"):
        make_tracker(cfg, {}, tmp_path)
    with pytest.raises(UserError, match=r"logger.name=tensorboard is unknown"):
        make_tracker(OmegaConf.merge(cfg, {"name": "tensorboard"}), {}, tmp_path)


def test_fsc_widths_pick_tib_inputs_and_merge_equal_tables():
    def quantizer(scales: list[float], bits: int = 4) -> UniformQuantizer:
        q = UniformQuantizer(n_bits=bits)
        q.set_step_tables(torch.tensor(scales), torch.zeros(len(scales)))
        return q

    net = torch.nn.Module()
    for i in range(3):  # every resnet's time_emb_proj reads the same activated embedding
        net.add_module(f"r{i}", torch.nn.Module())
        getattr(net, f"r{i}").add_module("time_emb_proj", torch.nn.Module())
        getattr(net, f"r{i}").time_emb_proj.input_quantizer = quantizer([0.1, 0.2])
    for i in range(6):
        net.add_module(f"conv{i}", torch.nn.Module())
        getattr(net, f"conv{i}").input_quantizer = quantizer([i + 1.0, i + 2.0], bits=8)
    net.add_module("plain", UniformQuantizer(n_bits=8))  # no step tables: not drawn
    widths = step_range_widths(net, max_quantizers=4)
    assert list(widths) == ["r0.time_emb_proj (+2 same)", "conv0", "conv2", "conv5"]
    assert widths["r0.time_emb_proj (+2 same)"] == pytest.approx([0.1 * 15, 0.2 * 15])
    assert widths["conv5"] == pytest.approx([6.0 * 255, 7.0 * 255])
    assert step_range_widths(torch.nn.Linear(2, 2)) == {}

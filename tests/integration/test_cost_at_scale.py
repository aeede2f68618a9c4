"""experiments/cost_at_scale.py: measured parts of the paper models' quantization cost and the projection.

The script runs in-process on two shrunk paper models (an unconditional LDM and the class-conditional one, whose
transformer blocks and guided budget take the other code paths), plus FFHQ, which has LSUN-Bedrooms' architecture
and recipes and so reuses its measurements; the JSON must hold positive finite numbers, the official budgets of the
presets, and a projection that is exactly the sum of its recomputed parts.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "cost_at_scale.py"
MODELS = ("ldm_bedroom", "ldm_cin256", "ldm_ffhq")


cas = load_script(SCRIPT, "cost_at_scale_under_test")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost") / "cost.json"
    rc = cas.main(["--models", *MODELS, "--shrink", "16", "--latent-size", "16", "--iters", "1", "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def numbers(obj, path=""):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")


def test_the_json_says_what_ran_where(run):
    res, _ = run
    assert res["device"] == "cpu" and res["threads"] >= 1 and res["torch"]
    assert (res["shrink"], res["latent_size"], res["iters"], res["bits"]) == (16, 16, 1, "w4a8")
    assert "projection from measured parts" in res["what"]
    assert list(res["models"]) == list(MODELS)
    for e in res["models"].values():
        assert set(e) >= {"budget", "arch", "units", "methods", "fp_forward", "tfmq_model", "memory"}
        assert set(e["methods"]) == {"brecq", "qdiff", "tfmq"}
        assert e["arch"]["model_channels"] == 32 and e["arch"]["latent"][1:] == [16, 16]


def test_every_number_is_finite_and_the_measured_ones_positive(run):
    res, _ = run
    for path, v in numbers(res):
        assert math.isfinite(v), path
    for name, e in res["models"].items():
        positive = [e["arch"]["forward_flops"], e["arch"]["parameters"], e["fp_forward"]["step_s"],
                    e["fp_forward"]["per_sample_s"], e["tfmq_model"]["weight_ranges_s"],
                    e["tfmq_model"]["tiar"]["s_per_100"], e["tfmq_model"]["fsc"]["init_s"],
                    e["tfmq_model"]["fsc"]["ema_s"], e["memory"]["record_bytes"]]
        for method, m in e["methods"].items():
            assert m["weight_units"], (name, method)
            for key, u in m["measured"].items():
                assert u["flops"] > 0, (name, method, key)
                loops = ("adaround", "lsq") if method != "tfmq" else ("adaround",)
                for loop in loops:
                    positive += [u[loop]["s_per_100"], u[loop]["saved_for_backward_bytes"]]
                    assert u[loop]["measured_batch"] == u[loop]["batch"]  # a shrunk unit fits
            positive += [m["projection"]["total_s"], e["memory"]["methods"][method]["weight_pool_bytes"],
                         e["memory"]["methods"][method]["largest_unit_cache"]["bytes"]]
            assert all(v >= 0 for v in m["projection"]["parts"].values())
        assert all(v > 0 for v in positive), name
        assert all(u["flops"] >= 0 and u["prefix_flops"] >= 0 for u in e["units"])


def fitted(fit, flops):
    return fit["intercept_s"] + fit["s_per_flop"] * flops


def test_the_projection_is_the_sum_of_its_parts(run):
    res, _ = run
    for name, e in res["models"].items():
        b, units, tf = e["budget"], {u["name"]: u for u in e["units"]}, e["tfmq_model"]
        per_sample = e["fp_forward"]["recon_batch_s"] / e["fp_forward"]["recon_batch"]
        for method, m in e["methods"].items():
            bm = b["methods"][method]
            kind = {n: "transformer" if units[n]["class"] == "BasicTransformerBlock" else "resnet"
                    for n in m["weight_units"]}

            def loop_s(loop, iters, m=m, kind=kind, units=units):
                return iters / 100 * sum(fitted(m["fits"][loop][kind[n]], units[n]["flops"]) for n in m["weight_units"])

            lsq = method != "tfmq"
            share = sum(2 * units[n]["prefix_flops"] + units[n]["flops"] for n in m["weight_units"])
            share /= e["arch"]["forward_flops"]
            lsq_share = sum(units[n]["prefix_flops"] + units[n]["flops"] for n in m["weight_units"])
            lsq_share /= e["arch"]["forward_flops"]
            fsc = tf["fsc"]
            assert (fsc["init_samples"], fsc["batch"], fsc["scaled"]) == (16, 16, False)  # shrunk models fit
            want = {
                "adaround_s": loop_s("adaround", 20000),
                "lsq_s": loop_s("lsq", 5000) if lsq else 0.0,
                "captures_s": bm["pool_size"] * per_sample * (share + (lsq_share if lsq else 0.0)),
                "tiar_s": 200 * tf["tiar"]["s_per_100"] if method == "tfmq" else 0.0,
                "fsc_s": b["steps"] * (fsc["init_s"] + b["fsc_per_step"] / 16 * fsc["ema_s"]) if method == "tfmq"
                else 0.0,
                "act_init_s": 0.0 if method == "tfmq" else fsc["init_s"] * bm["act_calib_samples"] / 16
                + (bm["pool_size"] / 16 * fsc["ema_s"] if bm["running_stat"] else 0.0),
                "weight_ranges_s": tf["weight_ranges_s"],
                "calib_record_s": b["record_sample_forwards"]["one_pass"] * per_sample,
            }
            got = m["projection"]["parts"]
            assert set(got) == set(want)
            for k, v in want.items():
                assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, method, k)
            assert m["projection"]["total_s"] == pytest.approx(sum(want.values()), rel=1e-12)


def test_the_cross_check_times_tfmq_units_at_brecq_rates(run):
    res, md = run
    for name, e in res["models"].items():
        tf, br = e["methods"]["tfmq"], e["methods"]["brecq"]
        swapped = copy.deepcopy(e)
        swapped["methods"]["tfmq"]["fits"] = br["fits"]
        want = cas.project(swapped, "tfmq")
        assert tf["projection"]["total_s_at_brecq_rates"] == pytest.approx(want["total_s"], rel=1e-12)
        assert tf["projection"]["total_s_at_brecq_rates"] - tf["projection"]["total_s"] == pytest.approx(
            want["parts"]["adaround_s"] - tf["projection"]["parts"]["adaround_s"], rel=1e-9)  # AdaRound alone moves
        row = f"| {name} | {tf['projection']['total_s'] / e['methods']['qdiff']['projection']['total_s']:.2f} | "
        assert row in md


def test_each_fit_goes_through_its_measured_units_unless_clipped(run):
    res, _ = run
    for e in res["models"].values():
        for m in e["methods"].values():
            for loop, fits in m["fits"].items():
                for kind, fit in fits.items():
                    assert fit["intercept_s"] >= 0 and fit["s_per_flop"] >= 0
                    pts = [(u["flops"], u[loop]["s_per_100"]) for u in m["measured"].values()
                           if loop in u and cas.fit_kind(u["class"]) == kind]
                    if len(pts) == 2 and fit["intercept_s"] > 0 and fit["s_per_flop"] > 0:
                        for f, t in pts:
                            assert fitted(fit, f) == pytest.approx(t, rel=1e-9)


def test_the_budgets_are_the_official_ones(run):
    res, _ = run
    bed, cin = res["models"]["ldm_bedroom"]["budget"], res["models"]["ldm_cin256"]["budget"]
    assert (bed["steps"], bed["guided"], bed["recon_batch"], bed["iters"], bed["act_iters"]) == (200, False, 32, 20000,
                                                                                                  5000)
    assert bed["record_sample_forwards"]["one_pass"] == 256 * 200
    assert {m["pool_size"] for m in bed["methods"].values()} == {5120}
    assert (bed["fsc_init_samples"], bed["fsc_batch_size"], bed["fsc_per_step"]) == (16, 16, 256)
    assert (cin["steps"], cin["guided"], cin["recon_batch"], cin["fsc_per_step"]) == (20, True, 8, 512)
    assert cin["record_sample_forwards"]["one_pass"] == 256 * 20 * 2  # every call is the doubled batch [uc, c]
    assert {m["pool_size"] for m in cin["methods"].values()} == {10240}
    assert res["models"]["ldm_cin256"]["fp_forward"]["step_batch"] == 2
    assert res["models"]["ldm_cin256"]["arch"]["context"] == [1, 512]  # the class token of the ClassEmbedder
    sd = cas.budget_of(cas.compose_presets("sd"))
    assert (sd["steps"], sd["model_calls_per_trajectory"], sd["guided"]) == (50, 51, True)  # PLMS: one extra call
    assert sd["record_sample_forwards"]["one_pass"] == 128 * 51 * 2
    assert {k: v["pool_size"] for k, v in sd["methods"].items()} == {"brecq": 12800, "qdiff": 6400, "tfmq": 12800}


def test_a_model_with_the_same_architecture_and_recipes_reuses_the_measurements(run):
    res, _ = run
    bed, ffhq = res["models"]["ldm_bedroom"], res["models"]["ldm_ffhq"]
    assert ffhq["measured_as"] == "ldm_bedroom" and "measured_as" not in bed
    assert ffhq["budget"]["preset"] == "paper/ffhq_w4a8" and ffhq["measure_wall_s"] == 0
    for key in ("arch", "units", "fp_forward", "tfmq_model", "memory"):
        assert ffhq[key] == bed[key]
    for method in ("brecq", "qdiff", "tfmq"):  # same budget as LSUN-Bedrooms (200 steps, pools of 5,120)
        assert ffhq["methods"][method]["projection"] == bed["methods"][method]["projection"]


def test_the_units_follow_each_method_recipe(run):
    res, _ = run
    bed = res["models"]["ldm_bedroom"]["methods"]
    # TFMQ-DM: conv_in/conv_out FP, downsamplers unwrapped, LDM attention projections FP, time MLP left to TIAR
    for unit in ("conv_in", "conv_out", "down_blocks.0.downsamplers.0.conv", "down_blocks.1.attentions.0",
                 "time_embedding.linear_2"):
        assert unit not in bed["tfmq"]["weight_units"]
        assert unit in bed["brecq"]["weight_units"] and unit in bed["qdiff"]["weight_units"]
    cin = res["models"]["ldm_cin256"]["methods"]
    assert "down_blocks.1.attentions.0.transformer_blocks.0" in cin["tfmq"]["weight_units"]
    assert set(cin["qdiff"]["measured"]) == {"resnet_hi", "resnet_lo", "transformer_hi", "transformer_lo"}
    assert cin["qdiff"]["measured"]["transformer_hi"]["class"] == "BasicTransformerBlock"


def test_the_table_says_it_is_shrunk_and_a_projection(run):
    _, md = run
    assert "not a real-size figure" in md and "projection from measured parts" in md
    for name in MODELS:
        assert sum(line.startswith(f"| {name} (paper/") for line in md.splitlines()) == 3


def test_helpers():
    assert cas.shrunk_width(320, 16) == 32 and cas.shrunk_width(320, 1) == 320 and cas.shrunk_width(320, 2) == 160
    p = cas.shrink_unet_params({"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_heads": 8}, "ldm", 16)
    assert p["model_channels"] == 32 and all((32 * m) % p["num_heads"] == 0 for m in (1, 2, 4, 4))
    assert cas.fitting_batch(32, 10, 100) == 8 and cas.fitting_batch(8, 1, 100) == 8
    assert cas.fitting_batch(8, 10**9, 1) == 1 and cas.fitting_batch(8, 1, 100, fixed=95) == 4
    line = cas.fit_line([(1.0, 2.0), (3.0, 6.0)])
    assert line == {"intercept_s": 0.0, "s_per_flop": 2.0}
    assert cas.fit_line([(1.0, 3.0), (3.0, 5.0)]) == {"intercept_s": 2.0, "s_per_flop": 1.0}
    assert cas.fit_line([(1.0, 5.0), (3.0, 3.0)]) == {"intercept_s": 4.0, "s_per_flop": 0.0}


def test_the_sampled_peak_sees_a_block_below_the_process_high_water_mark():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB: the process's max RSS is now at least this much higher
    del big
    with cas.Peak(torch.device("cpu")) as peak:
        x = torch.ones(48 * 2**20 // 4)  # 48 MiB, below the earlier high-water mark
        time.sleep(0.2)  # some 40 polls: one is enough, even on a loaded machine
        del x
    assert 40 * 2**20 < peak.report()["peak_growth_bytes"] < 200 * 2**20


def test_the_peak_counts_heap_blocks_an_earlier_phase_freed():
    """An earlier phase's freed blocks stay resident; a block that reuses them must still count."""
    blocks = [torch.ones(16384) for _ in range(4000)]  # 4,000 x 64 KiB (250 MiB) of heap
    keep = torch.ones(16384)  # allocated last, so free() cannot shrink the heap from its top
    del blocks
    with cas.Peak(torch.device("cpu")) as peak:
        again = [torch.ones(16384) for _ in range(3000)]  # 190 MiB
        del again
    assert 150 * 2**20 < peak.report()["peak_growth_bytes"] < 400 * 2**20
    assert keep.sum() == 16384


def test_released_memory_leaves_the_process_before_the_next_phase():
    """Freed small blocks stay resident in the heap until released, and would shrink the next phase's batch."""
    cas.release_memory(torch.device("cpu"))  # what earlier tests freed would otherwise hold these blocks unseen
    base = cas._resident_bytes()
    blocks = [torch.ones(16384) for _ in range(4000)]  # 4,000 x 64 KiB (250 MiB): heap blocks, not mappings
    keep = torch.ones(16384)  # allocated last: the freed blocks are not at the heap's top, so free() keeps them
    del blocks
    held = cas._resident_bytes() - base
    cas.release_memory(torch.device("cpu"))
    after = cas._resident_bytes() - base
    assert held > 200 * 2**20 and after < held - 200 * 2**20
    assert keep.sum() == 16384


def test_fsc_that_does_not_fit_runs_at_batch_1_and_scales_to_the_official_sizes():
    from tfmq_exp.recon.engine import FabricRunner

    cfgs = cas.compose_presets(cas.PRESETS["ldm_bedroom"])
    budget = cas.budget_of(cfgs)
    unet, _ = cas.build_unet(cfgs["tfmq"].model, 16)
    spec = cas.spec_of(cfgs["tfmq"].model, unet, 16)
    bench = cas.Bench(unet, spec, torch.device("cpu"), FabricRunner("cpu", 1), 1, 1, mem_limit=1)
    fsc = cas.measure_tfmq_model(bench, cfgs["tfmq"], "ldm", budget, [1, 501])["fsc"]
    assert (fsc["init_samples"], fsc["batch"], fsc["scaled"]) == (1, 1, True)
    assert (fsc["official_init_samples"], fsc["official_batch"]) == (16, 16)
    assert fsc["probe_peak_bytes_per_sample"] > 1
    assert fsc["per_step_s"] == pytest.approx(fsc["init_s"] * 16 + 256 * fsc["ema_s"], rel=1e-12)


def test_a_bad_model_name_is_one_line_and_exit_2(tmp_path, capsys):
    assert cas.main(["--models", "ldm_bedroom", "nope", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "ldm_bedroom" in err[0]
    assert not (tmp_path / "x.json").exists()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "nope"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "unknown model 'nope'" in proc.stderr


def test_runs_of_a_few_models_each_merge_into_one_table(run, tmp_path, capsys):
    res, _ = run
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    stale = json.loads(json.dumps(res["models"]["ldm_bedroom"]))
    stale["methods"]["qdiff"]["projection"]["total_s"] = -1.0  # written by an older projection formula
    first.write_text(json.dumps(dict(res, models={"ldm_bedroom": stale}, created="day 1")))
    second.write_text(json.dumps(dict(res, models={k: v for k, v in res["models"].items() if k != "ldm_bedroom"},
                                      created="day 2")))
    out = tmp_path / "merged.json"
    assert cas.main(["--merge", str(first), str(second), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["models"] == res["models"]  # every model, its measured numbers untouched, the stale projection redone
    assert merged["runs"] == [{"created": "day 1", "models": ["ldm_bedroom"]},
                              {"created": "day 2", "models": ["ldm_cin256", "ldm_ffhq"]}]
    md = out.with_suffix(".md").read_text()
    assert "day 1, day 2" in md and all(f"| {m} (paper/" in md for m in MODELS)
    # a merged file merged again (alone: the projections recomputed) keeps its run history
    again = tmp_path / "again.json"
    assert cas.main(["--merge", str(out), "--out", str(again)]) == 0
    assert json.loads(again.read_text()) == merged
    # runs of another setting do not mix: one line, exit 2, nothing written
    second.write_text(json.dumps(dict(res, threads=res["threads"] + 1)))
    assert cas.main(["--merge", str(first), str(second), "--out", str(tmp_path / "no.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cost_at_scale: error: --merge {second}: threads differ from {first}")
    assert not (tmp_path / "no.json").exists()

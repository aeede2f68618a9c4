"""export.step_tables=per_step: one IR whose quantize ranges are set per step, sampled step-major."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest
import torch
from export_models import N_STEPS, quantize_rtn, tiny_unet
from test_export_task import STEPS, make_ckpt

from tfmq_exp.app import run
from tfmq_exp.errors import UserError
from tfmq_exp.export import openvino_backend as ovb
from tfmq_exp.export.deploy_graph import baked_step_ranges, build_deploy_model, step_table_groups
from tfmq_exp.quant.steps import step_context
from tfmq_exp.tasks.export import write_step_ranges

SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def step0(w8a8_tables):
    """The tables model's deploy graph at step 0 and its conversion, shared (a conversion takes seconds);
    a test that sets ranges on the IR works on a clone."""
    deploy = build_deploy_model(w8a8_tables, "per_step", step=0)
    return deploy, ovb.convert(deploy, ovb.example_inputs(SHAPE, 2))


def test_each_steps_ranges_are_what_converting_that_step_writes(w8a8_tables, step0, tmp_path):
    """The one converted IR with step k's ranges set is the IR a conversion of step k would give: the same
    quantize constants bit for bit, and the same outputs bit for bit from the runtime."""
    q = w8a8_tables
    groups = step_table_groups(q)
    assert len(groups) == N_STEPS  # the tables differ at every step
    example = ovb.example_inputs(SHAPE, 2)
    deploy, base = step0
    write_step_ranges(tmp_path / "ranges.npz", base, deploy, groups)
    ovb.save(base, tmp_path / "model.xml")
    with np.load(tmp_path / "ranges.npz") as z:
        names, lo, hi = [str(n) for n in z["names"]], z["lo"], z["hi"]
    assert len(names) > 20 and lo.shape == hi.shape == (N_STEPS, len(names))
    x, t = torch.randn(2, *SHAPE), torch.full((2,), 300)
    feeds = {"sample": x.numpy(), "timestep": t.numpy()}
    for step in range(1, N_STEPS):
        direct = ovb.convert(build_deploy_model(q, "per_step", step=step), example)
        named = [i for i, n in enumerate(names) if n.startswith("__module.")]  # merged nodes get numbered names
        want_lo, want_hi = ovb.fake_quantize_ranges(direct, [names[i] for i in named])
        assert np.array_equal(lo[step, named], want_lo) and np.array_equal(hi[step, named], want_hi)
        assert not np.array_equal(lo[step], lo[0])  # the step really moves the ranges
        patched = ov.Core().read_model(str(tmp_path / "model.xml"))
        ovb.set_fake_quantize_ranges(patched, names, lo[step], hi[step])
        a = ovb.compile_model(patched, "f32", threads=1, batch=2)
        b = ovb.compile_model(direct, "f32", threads=1, batch=2)
        out_a = a({**feeds, "step": np.array(step)})[a.outputs[0]]
        out_b = b({**feeds, "step": np.array(step)})[b.outputs[0]]
        assert np.array_equal(out_a, out_b)


def test_merged_quantize_nodes_with_tables_that_part_are_refused(step0, tmp_path):
    """to_q, to_k and to_v read one input; with equal constants at the converted step the converter merges
    their quantize nodes into one, so tables that differ at another step cannot be set: one clear error."""
    q = quantize_rtn(tiny_unet(), 8, tables=True)  # its own copy of the shared model: its tables are changed below
    deploy = build_deploy_model(q, "per_step", step=0)
    base = step0[1]
    merged = ovb.merged_fake_quantize(base, sorted(baked_step_ranges(deploy, [0])))
    assert len(merged) >= 3 and len(set(merged.values())) < len(merged) and "" not in merged.values()
    write_step_ranges(tmp_path / "ok.npz", base, deploy, step_table_groups(q))  # equal tables: fine
    k = q.get_submodule("down_blocks.1.attentions.0.to_k").input_quantizer
    k.set_step_tables(k.step_scale * torch.tensor([1.0, 1.1, 1.0, 1.0]), k.step_zero_point)
    deploy = build_deploy_model(q, "per_step", step=0)
    attn = r"down_blocks.1.attentions.0.to_[qkv].parts.0"
    with pytest.raises(UserError, match=rf"merged the input quantizers of {attn} and {attn} .*Fix: export with "
                       r"export.step_tables=runtime"):
        write_step_ranges(tmp_path / "bad.npz", base, deploy, step_table_groups(q))
    assert not (tmp_path / "bad.npz").exists()


def test_a_range_set_that_does_not_fit_the_model_is_refused(step0):
    deploy, model = step0[0], step0[1].clone()
    names = sorted(baked_step_ranges(deploy, [0]))
    names = [n for n in names if n not in ovb.merged_fake_quantize(model, names)]
    try:
        ovb.set_fake_quantize_ranges(model, names + ["no.such/FakeQuantize"], np.zeros(len(names) + 1),
                                     np.ones(len(names) + 1))
    except ValueError as err:
        assert "1 quantize node(s) not in the model, e.g. no.such/FakeQuantize" in str(err)
    else:
        raise AssertionError("a missing quantize node was accepted")


def test_per_step_export_samples_step_major_with_one_model_in_memory(make_cfg, tmp_path):
    ckpt = make_ckpt(make_cfg, tmp_path / "quantized.safetensors")
    exp_dir = tmp_path / "export"
    exp_dir.mkdir()
    cfg = make_cfg("task=export", f"ckpt={ckpt}", "export.threads=1", *STEPS)  # per_step: the default
    cfg.paths.output_dir = str(exp_dir)
    res = run(cfg)
    assert res["step_tables"] == "per_step" and res["n_models"] == N_STEPS
    assert res["quantized_layers_not_int8"] == []
    assert all(d["rel_l2"] < 0.02 for d in res["unet_vs_fake_quant"].values())  # steps 0, 2, 3 patched
    manifest = json.loads((exp_dir / "export.json").read_text())
    assert sorted(p.name for p in exp_dir.glob("*.xml")) == ["model.xml"]  # one IR on disk
    assert [m["steps"] for m in manifest["models"]] == [[i] for i in range(N_STEPS)]

    images, info = {}, {}
    for backend, chunk in (("torch", 1000), ("openvino", 1000), ("openvino", 3)):
        out = tmp_path / f"{backend}_{chunk}"
        out.mkdir()
        cfg = make_cfg("task=sample", f"ckpt={ckpt}", f"backend={backend}", f"export.dir={exp_dir}",
                       "export.threads=1", f"export.chunk={chunk}", *STEPS[:-2], "n_compare=5", "n_grid=5")
        cfg.paths.output_dir = str(out)
        info[out.name] = run(cfg).get("openvino")
        images[out.name] = np.load(out / "samples.npz")["arr_0"].astype(np.int16)
    # all 5 samples in one chunk: each step's model compiled once, called at the sampler's batch (4, then
    # 1 padded to 4); chunks of 3: twice
    assert info["openvino_1000"]["compiles"] == N_STEPS and info["openvino_1000"]["sampling_batch"] == 1000
    assert info["openvino_1000"]["call_batch"] == 4
    assert info["openvino_3"]["compiles"] == 2 * N_STEPS
    # chunking does not change a sample (per-sample noise, batch rows independent) ...
    assert np.array_equal(images["openvino_1000"], images["openvino_3"])
    # ... and the samples are the fake-quant model's up to code flips at rounding boundaries (as runtime's)
    mse = ((images["torch_1000"] - images["openvino_1000"]) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 30


def test_the_runner_keeps_at_most_max_models_compiled(w8a8_tables, step0, tmp_path):
    deploy, base = step0
    groups = step_table_groups(w8a8_tables)
    write_step_ranges(tmp_path / "step_ranges.npz", base, deploy, groups)
    ovb.save(base, tmp_path / "model.xml")
    (tmp_path / "export.json").write_text(json.dumps({
        "step_tables": "per_step", "step_ranges": "step_ranges.npz",
        "models": [{"xml": "model.xml", "steps": g, "ranges": k} for k, g in enumerate(groups)]}))
    runner = ovb.OpenVINOUNet(tmp_path, threads=1, max_models=2, call_batch=2)
    x, t = torch.randn(5, *SHAPE), torch.full((5,), 300)
    for step in (0, 1, 0, 2, 0, 3):
        with torch.no_grad(), step_context(step):
            got = runner(x, t)
            ref = w8a8_tables(x, t).sample
        assert got.shape == (5, *SHAPE) and float((got - ref).norm() / ref.norm()) < 0.05
        assert len({k for k, _ in runner._compiled}) <= 2
    assert runner.stats["compiles"] == 4  # 0, 1, 2, 3: step 0 stayed the most recently used


def test_a_step_model_executes_the_single_range_graph(w8a8_tables, step0):
    """Why per_step costs nothing per call: the runtime executes a step's model as the same layers in the same
    precisions as a model with one range per quantizer (only constants differ; an 8-bit input is u8 or i8 by
    the sign of its range), while the one-model form adds layers."""
    def executed(model):
        cm = ovb.compile_model(model, "f32", threads=1, batch=2)
        ops = cm.get_runtime_model().get_ops()
        prec = {"u8": "int8", "i8": "int8"}
        return sorted((op.get_rt_info()["layerType"].astype(str),
                       prec.get(p := op.get_rt_info()["runtimePrecision"].astype(str), p)) for op in ops)

    example = ovb.example_inputs(SHAPE, 2)
    one_range = executed(ovb.convert(build_deploy_model(quantize_rtn(tiny_unet(), 8)), example))
    q = w8a8_tables
    deploy, model = step0[0], step0[1].clone()
    ranges = baked_step_ranges(deploy, [2])
    names = [n for n in sorted(ranges) if n not in ovb.merged_fake_quantize(model, sorted(ranges))]
    ovb.set_fake_quantize_ranges(model, names, np.array([ranges[n][0][0] for n in names]),
                                 np.array([ranges[n][1][0] for n in names]))
    assert executed(model) == one_range
    assert len(executed(ovb.convert(build_deploy_model(q, "runtime"), example))) > len(one_range)

"""OpenVINO export: integer execution read from the runtime, outputs and samples against fake-quant."""

from __future__ import annotations

import sys

import pytest
import torch
from export_models import N_STEPS, quantize_rtn, tiny_unet

from tfmq_exp.diffusion.sampling import Sampler, unet_fn
from tfmq_exp.errors import UserError
from tfmq_exp.export import openvino_backend as ovb
from tfmq_exp.export.deploy_graph import build_deploy_model, step_table_groups
from tfmq_exp.quant.modules import quant_modules
from tfmq_exp.quant.steps import step_context

SHAPE = (3, 8, 8)
SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
# Tolerances: the runtime multiplies by 1/scale where the fake-quant model divides, so a value within
# an ulp of a rounding boundary can land on the next code; one flipped code moves a layer output by
# one scale step. Measured: relative L2 about 1e-3 on these models.
REL_L2 = 0.02


def quantized_names(unet: torch.nn.Module) -> set[str]:
    return {n for n, m in quant_modules(unet)
            if any(q.enabled for q in m.weight_quantizers()) and any(q.enabled for q in m.input_quantizers())}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compile_deploy(deploy, batch: int = 2):
    model = ovb.convert(deploy, ovb.example_inputs(SHAPE, batch))
    return ovb.compile_model(model, "f32", threads=1, batch=batch)


def run_compiled(cm, x, t, step):
    out = cm({"sample": x.numpy(), "timestep": t.numpy(), "step": torch.tensor(step).numpy()})
    return torch.from_numpy(out[cm.outputs[0]])


@pytest.mark.parametrize("mode", ["runtime", "per_step"])
def test_deploy_graph_in_torch_matches_fake_quant(w8a8_tables, mode):
    x, t = torch.randn(2, *SHAPE), torch.full((2,), 400)
    runtime = build_deploy_model(w8a8_tables, mode) if mode == "runtime" else None
    for step in range(N_STEPS):
        with torch.no_grad(), step_context(step):
            ref = w8a8_tables(x, t).sample
        deploy = runtime or build_deploy_model(w8a8_tables, mode, step=step)
        with torch.no_grad():
            got = deploy(x, t, torch.tensor(step))
        assert rel_l2(got, ref) < REL_L2


def test_runtime_tables_run_int8_and_match_every_step(w8a8_tables):
    cm = compile_deploy(build_deploy_model(w8a8_tables, "runtime"))
    rep = ovb.precision_report(cm)
    assert quantized_names(w8a8_tables) <= set(rep["int8_modules"])  # every quantized layer runs on integers
    x, t = torch.randn(2, *SHAPE), torch.full((2,), 400)
    for step in range(N_STEPS):
        with torch.no_grad(), step_context(step):
            ref = w8a8_tables(x, t).sample
        assert rel_l2(run_compiled(cm, x, t, step), ref) < REL_L2


def test_tables_fed_to_the_quantize_op_lose_the_integer_kernels(w8a8_tables):
    cm = compile_deploy(build_deploy_model(w8a8_tables, "runtime_fq"))
    assert not quantized_names(w8a8_tables) & set(ovb.precision_report(cm)["int8_modules"])


def test_w4a8_single_range_runs_int8_and_matches():
    q = quantize_rtn(tiny_unet(1), 4)
    assert step_table_groups(q) == []
    cm = compile_deploy(build_deploy_model(q))
    assert quantized_names(q) <= set(ovb.precision_report(cm)["int8_modules"])
    x, t = torch.randn(2, *SHAPE), torch.full((2,), 700)
    with torch.no_grad():
        ref = q(x, t).sample
    assert rel_l2(run_compiled(cm, x, t, 0), ref) < REL_L2


def test_sampling_through_the_runtime_matches_fake_quant_samples(w8a8_tables, tmp_path):
    import json

    model = ovb.convert(build_deploy_model(w8a8_tables, "runtime"), ovb.example_inputs(SHAPE, 2))
    ovb.save(model, tmp_path / "model.xml")
    (tmp_path / "export.json").write_text(json.dumps({"models": [{"xml": "model.xml", "steps": None}]}))
    runner = ovb.OpenVINOUNet(tmp_path, threads=1)
    sampler = Sampler(SCHED, steps=N_STEPS, eta=0.0)
    ref = sampler.sample(unet_fn(w8a8_tables), 3, SHAPE, seed=5, batch_size=3)
    got = sampler.sample(runner, 3, SHAPE, seed=5, batch_size=3)
    assert rel_l2(got, ref) < REL_L2
    assert (got - ref).abs().max() < 0.1


def test_missing_runtime_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(UserError, match=r"OpenVINO runtime is not installed.*pip install -e \"\.\[deploy\]\""):
        ovb.require_openvino()

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
# Tolerances: torch.fake_quantize_* and the runtime compute round(x * (1/s) + z) where the fake-quant
# model computes round(x / s) + z, so a value within an ulp of a rounding boundary can land on the
# next code, and the random tiny UNet amplifies a flipped code. Measured: relative L2 up to 0.025
# (one step of one table), usually below 1e-3; the embedded model's UNet outputs agree to 0.2-0.6%.
REL_L2 = 0.05


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


def test_a_converted_model_owns_its_constants(w8a8_tables):
    """The converted model outlives the DeployUNet it was traced from (``convert(build_deploy_model(..))``), so
    none of its constants may point into that module's tensors: with the converter's default memory sharing,
    118 of them did, and the freed memory crashed long test runs."""
    deploy = build_deploy_model(w8a8_tables, "per_step", step=1)
    torch_mem = {t.data_ptr() for t in [*deploy.parameters(), *deploy.buffers()]}
    model = ovb.convert(deploy, ovb.example_inputs(SHAPE, 2))
    consts = [op.get_data() for op in model.get_ops() if op.get_type_name() == "Constant"]
    assert len(consts) > 100 and len(torch_mem) > 100
    assert not torch_mem & {c.__array_interface__["data"][0] for c in consts}


@pytest.mark.parametrize("mode", ["runtime", "per_step"])
@pytest.mark.parametrize("tables", ["w8a8_tables", "w8a8_scale_tables"])
def test_deploy_graph_in_torch_matches_fake_quant(tables, mode, request):
    w8a8_tables = request.getfixturevalue(tables)
    x, t = torch.randn(2, *SHAPE), torch.full((2,), 400)
    runtime = build_deploy_model(w8a8_tables, mode) if mode == "runtime" else None
    for step in range(N_STEPS):
        with torch.no_grad(), step_context(step):
            ref = w8a8_tables(x, t).sample
        deploy = runtime or build_deploy_model(w8a8_tables, mode, step=step)
        with torch.no_grad():
            got = deploy(x, t, torch.tensor(step))
        assert rel_l2(got, ref) < REL_L2


@pytest.mark.parametrize("tables", ["w8a8_tables", "w8a8_scale_tables"])
def test_runtime_rescaling_equals_baked_constants(tables, request):
    """Layer by layer, the one-model form (step index as input, rescaled input, explicit padding, output
    correction) computes what that step's constants compute: equal up to float rounding, except where
    a value sits on a rounding boundary (a code flip: under 1% of the outputs)."""
    from tfmq_exp.export.deploy_graph import DeployLayer, step_input

    q = request.getfixturevalue(tables)
    runtime = dict(build_deploy_model(q, "runtime").unet.named_modules())
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for step in range(N_STEPS):
        baked = dict(build_deploy_model(q, "per_step", step=step).unet.named_modules())
        for name, layer in runtime.items():
            if not isinstance(layer, DeployLayer) or not layer.parts[0].rescale:
                continue
            shape = (2, layer.parts[0].weight.shape[1], 6, 6) if layer.is_conv else (2, layer.parts[0].weight.shape[1])
            x = torch.randn(shape, generator=gen) * 2
            with torch.no_grad(), step_input(torch.tensor(step)):
                a, b = layer(x), baked[name](x)
            close = (a - b).abs() <= 1e-4 * (1 + b.abs())
            assert close.float().mean() > 0.99, name
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("tables", ["w8a8_tables", "w8a8_scale_tables"])
def test_runtime_tables_run_int8_and_match_every_step(tables, request):
    q = request.getfixturevalue(tables)  # zero points that move per step, or one zero point (no correction)
    cm = compile_deploy(build_deploy_model(q, "runtime"))
    rep = ovb.precision_report(cm)
    assert quantized_names(q) <= set(rep["int8_modules"])  # every quantized layer runs on integers
    x, t = torch.randn(2, *SHAPE), torch.full((2,), 400)
    for step in range(N_STEPS):
        with torch.no_grad(), step_context(step):
            ref = q(x, t).sample
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
    # the saved model runs every quantized layer on integers (the runtime's own report) ...
    assert quantized_names(w8a8_tables) <= set(ovb.precision_report(runner.compiled(0, 3))["int8_modules"])
    # ... and samples what the fake-quant model samples from the same noise
    sampler = Sampler(SCHED, steps=N_STEPS, eta=0.0)
    ref = sampler.sample(unet_fn(w8a8_tables), 3, SHAPE, seed=5, batch_size=3)
    got = sampler.sample(runner, 3, SHAPE, seed=5, batch_size=3)
    assert rel_l2(got, ref) < REL_L2
    assert (got - ref).abs().max() < 0.1


def test_missing_runtime_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(UserError, match=r"OpenVINO runtime is not installed.*pip install -e \"\.\[deploy\]\""):
        ovb.require_openvino()


def test_compiled_models_freed_oldest_first_leave_a_live_signal_stack(w8a8_tables):
    """OpenVINO gives each compiled model a signal stack and, freeing it, restores the one current at its
    compile: freed oldest first, that was the other model's stack, already unmapped, and the next signal
    (a subprocess's SIGCHLD under torch's data-loader handler) crashed the test process. Every compile now
    starts from a stack owned by tfmq_exp, so that is what any freed model restores."""
    import gc

    from tfmq_exp.export import signal_stack

    model = ovb.convert(build_deploy_model(w8a8_tables, "per_step", step=0), ovb.example_inputs(SHAPE, 2))
    a = ovb.compile_model(model, "f32", threads=1, batch=2)
    a_stack = signal_stack.current()
    b = ovb.compile_model(model, "f32", threads=1, batch=2)
    assert signal_stack.current()[0] not in (0, a_stack[0])  # the runtime's own stacks, one per model
    del a
    gc.collect()
    del b
    gc.collect()
    sp, size, flags = signal_stack.current()
    assert (sp, size) == signal_stack.owned() and flags == 0 and sp != a_stack[0]

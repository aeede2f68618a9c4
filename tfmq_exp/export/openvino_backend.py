"""OpenVINO: convert a deploy UNet, save it as IR, compile it, report executed precisions, run it.

The int8 claim is read from the compiled model itself: ``get_runtime_model()`` lists every executed
node with its ``layerType``, ``runtimePrecision`` and input element types. A layer counts as integer
when it reports ``u8``/``i8`` and its activation input is ``u8``/``i8`` (a fully connected layer
with int8 weights decompressed on the fly also reports ``i8``, over a float input).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tfmq_exp.errors import UserError  # torch is imported where needed: the benchmark's runtime workers go without it

COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul", "GroupConvolution", "Deconvolution")
INT_PRECISIONS = ("u8", "i8")


def require_openvino() -> Any:
    """The openvino module, or one line saying what to install."""
    try:
        import openvino
    except ImportError:
        raise UserError(
            "the OpenVINO runtime is not installed (needed by task=export and backend=openvino). "
            "Fix: pip install -e \".[deploy]\" (or pip install openvino)."
        ) from None
    return openvino


def example_inputs(image_shape: tuple[int, ...], batch: int, cond: tuple[int, int] | None = None) -> dict[str, Any]:
    """Inputs of a DeployUNet by name: ``cond`` is (tokens, width) of the text encoder states."""
    import torch

    ex = {
        "sample": torch.randn(batch, *image_shape),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "step": torch.tensor(0, dtype=torch.long),
    }
    if cond is not None:
        ex["encoder_hidden_states"] = torch.randn(batch, *cond)
    return ex


def convert(deploy: Any, example: dict[str, Any], dynamic_batch: bool = True) -> Any:
    """ov.Model of a DeployUNet (traced), with a dynamic batch dimension when ``dynamic_batch``."""
    ov = require_openvino()
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = ov.convert_model(deploy, example_input=tuple(example.values()))
    for inp, name in zip(model.inputs, example):
        inp.get_tensor().set_names({name})
    if dynamic_batch:
        shapes = {}
        for inp, (name, t) in zip(model.inputs, example.items()):
            shape = list(t.shape)
            if name != "step":
                shape[0] = -1
            shapes[inp] = ov.PartialShape(shape)
        model.reshape(shapes)
    return model


def save(model: Any, xml: str | Path) -> Path:
    """IR (xml + bin). FP constants stay fp32; quantized weights are stored as integers by the serializer."""
    ov = require_openvino()
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return Path(xml)


def compile_model(model: Any, precision: str = "f32", threads: int = 0, batch: int | None = None) -> Any:
    """Compile for the CPU; ``batch`` fixes the batch dimension first (static shapes run faster)."""
    ov = require_openvino()
    core = ov.Core()
    if isinstance(model, (str, Path)):
        model = core.read_model(str(model))
    if batch is not None:
        shapes = {}
        for inp in model.inputs:
            ps = inp.get_partial_shape()
            if ps.rank.get_length() > 0 and "step" not in inp.get_names():
                dims = [batch] + [d.get_length() for d in list(ps)[1:]]
                shapes[inp] = ov.PartialShape(dims)
        model.reshape(shapes)
    # no dynamic quantization: integer layers must come from the checkpoint's own ranges, never from
    # activation scales the runtime picks by itself
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(model, "CPU", cfg)


def precision_report(compiled: Any) -> dict[str, Any]:
    """Executed precision of every compute layer, from the runtime's own execution graph."""
    counts: dict[str, dict[str, int]] = {}
    fp_layers: list[str] = []
    int_modules: set[str] = set()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind not in COMPUTE_LAYERS:
            continue
        prec = info["runtimePrecision"].astype(str).lower()
        # integer compute needs integer activations too: a layer with int8 weights decompressed on the fly
        # also reports i8, with a float input
        if str(op.input(0).get_element_type()) not in ("<Type: 'uint8_t'>", "<Type: 'int8_t'>"):
            prec = f"{prec} (float input)" if prec in INT_PRECISIONS else prec
        counts.setdefault(kind, {}).setdefault(prec, 0)
        counts[kind][prec] += 1
        if prec not in INT_PRECISIONS:
            fp_layers.append(op.get_friendly_name())
        else:
            int_modules.add(module_name(op.get_friendly_name()))
    n_int = sum(v for c in counts.values() for p, v in c.items() if p in INT_PRECISIONS)
    return {"by_layer_type": counts, "int8_layers": n_int, "float_layers": len(fp_layers),
            "float_layer_names": fp_layers, "int8_modules": sorted(int_modules)}


def module_name(node_name: str) -> str:
    """The UNet module a runtime node came from: '__module.unet.a.b.parts.0/aten::...' -> 'a.b'."""
    head = node_name.split("/")[0].removeprefix("__module.").removeprefix("unet.")
    return head.split(".parts.")[0]


class OpenVINOUNet:
    """An exported UNet as a sampler ``model_fn(x, t) -> eps``, compiled per batch size on first use.

    The step index comes from ``tfmq_exp.quant.steps.current_step()`` (the sampler sets it): with
    ``runtime`` tables it is an input of the one model; with ``per_step`` it picks the model.
    """

    def __init__(self, export_dir: str | Path, precision: str = "f32", threads: int = 0) -> None:
        require_openvino()
        self.dir = Path(export_dir)
        manifest = self.dir / "export.json"
        if not manifest.is_file():
            raise UserError(
                f"no export.json in {self.dir}. Fix: point export.dir at a folder written by task=export."
            )
        self.manifest = json.loads(manifest.read_text())
        self.precision, self.threads = precision, threads
        self.step_to_model = {}
        for k, m in enumerate(self.manifest["models"]):
            for s in m["steps"] or []:
                self.step_to_model[int(s)] = k
        self._compiled: dict[tuple[int, int], Any] = {}

    @property
    def timesteps(self) -> list[int] | None:
        return self.manifest.get("timesteps")

    def _model_index(self, step: int | None) -> int:
        if not self.step_to_model:
            return 0
        if step is None or step not in self.step_to_model:
            raise UserError(
                f"sampling step {step} has no exported model (steps 0..{len(self.step_to_model) - 1}). "
                "Fix: sample with the schedule the checkpoint was calibrated for."
            )
        return self.step_to_model[step]

    def compiled(self, k: int, batch: int) -> Any:
        key = (k, batch)
        if key not in self._compiled:
            xml = self.dir / self.manifest["models"][k]["xml"]
            self._compiled[key] = compile_model(xml, self.precision, self.threads, batch)
        return self._compiled[key]

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any = None) -> Any:
        import torch

        from tfmq_exp.quant.steps import current_step

        step = current_step()
        k = self._model_index(step)
        cm = self.compiled(k, x.shape[0])
        feeds = {"sample": x.detach().float().cpu().numpy(), "timestep": t.detach().long().cpu().numpy(),
                 "step": np.array(step or 0, dtype=np.int64),
                 "encoder_hidden_states": None if encoder_hidden_states is None else
                 encoder_hidden_states.detach().float().cpu().numpy()}
        names = {n for inp in cm.inputs for n in inp.get_names()}
        out = cm({n: v for n, v in feeds.items() if n in names and v is not None})
        return torch.from_numpy(np.asarray(out[cm.outputs[0]])).to(x.device)

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
from tfmq_exp.export import signal_stack

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
    """ov.Model of a DeployUNet (traced), with a dynamic batch dimension when ``dynamic_batch``.

    The model owns its constants (``share_weights=False``): by default the converter points constants at the
    torch tensors' memory without keeping them alive, so a model outliving its DeployUNet (the usual case:
    ``convert(build_deploy_model(...), ...)``) read freed memory, which crashed long test runs at random."""
    ov = require_openvino()
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = ov.convert_model(deploy, example_input=tuple(example.values()), share_weights=False)
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
    signal_stack.install()  # what the compiled model restores when freed must be a live stack
    return core.compile_model(model, "CPU", cfg)


def fake_quantize_ranges(model: Any, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Input range ends (low, high) of the named FakeQuantize nodes, in the order of ``names``."""
    nodes = _fake_quantize_nodes(model, names)
    lo = [float(nodes[n].input(1).get_source_output().get_node().get_data().reshape(-1)[0]) for n in names]
    hi = [float(nodes[n].input(2).get_source_output().get_node().get_data().reshape(-1)[0]) for n in names]
    return np.asarray(lo, np.float32), np.asarray(hi, np.float32)


def set_fake_quantize_ranges(model: Any, names: list[str], lo: np.ndarray, hi: np.ndarray) -> None:
    """Give the named per-tensor FakeQuantize nodes new constant ranges (input and output ends alike:
    the converter writes a quantize-dequantize as equal ranges), in place. The node stays a constant
    FakeQuantize, so the runtime folds it into the integer kernel as before."""
    from openvino import op

    nodes = _fake_quantize_nodes(model, names)
    for n, a, b in zip(names, lo, hi):
        node = nodes[n]
        for i, v in ((1, a), (2, b), (3, a), (4, b)):
            shape = tuple(node.input(i).get_source_output().get_node().get_output_shape(0))
            node.input(i).replace_source_output(op.Constant(np.full(shape, v, np.float32)).output(0))


SHAPE_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze")  # the converter moves a FakeQuantize across these


def merged_fake_quantize(model: Any, names: list[str]) -> dict[str, str]:
    """Named activation quantize nodes that no longer carry their name: the converter merged them into another
    (equal constants on one input, e.g. to_q/to_k/to_v) or moved them across a transpose or reshape (which then
    takes the name). Name -> the quantize node that now feeds the layer, found by walking up from the layer's
    input through such shape ops; "" when there is none."""
    present = {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"}
    merged = {}
    for name in names:
        if name in present:
            continue
        layer = name.split(".act/")[0] + "/"
        merged[name] = ""
        for op in model.get_ops():
            if not (op.get_friendly_name().startswith(layer) and op.get_type_name() in ("MatMul", "Convolution")):
                continue
            src = op.input(0).get_source_output().get_node()
            while src.get_type_name() in SHAPE_OPS:
                src = src.input(0).get_source_output().get_node()
            if src.get_type_name() == "FakeQuantize":
                merged[name] = src.get_friendly_name()
                break
    return merged


def load_step_ranges(path: str | Path) -> dict[str, Any]:
    """A per-step export's ``step_ranges.npz``: quantize node names and, per table set, their low and high ends."""
    with np.load(path) as z:
        return {"names": [str(n) for n in z["names"]], "lo": z["lo"], "hi": z["hi"]}


def read_step_model(xml: str | Path, ranges: dict[str, Any] | None = None, row: int = 0) -> Any:
    """The IR at ``xml``; with ``ranges``, table set ``row`` set into its quantize nodes (that step's model)."""
    model = require_openvino().Core().read_model(str(xml))
    if ranges is not None:
        set_fake_quantize_ranges(model, ranges["names"], ranges["lo"][row], ranges["hi"][row])
    return model


def _fake_quantize_nodes(model: Any, names: list[str]) -> dict[str, Any]:
    nodes = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise ValueError(f"{len(missing)} quantize node(s) not in the model, e.g. {missing[0]}")
    for n in names:
        if any(nodes[n].input(i).get_source_output().get_node().get_type_name() != "Constant" for i in range(1, 5)):
            raise ValueError(f"quantize node {n} has non-constant ranges")
    return nodes


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
    ``runtime`` tables it is an input of the one model; with ``per_step`` it picks the model, which
    is the one IR with that step's quantize ranges set (``step_ranges.npz``) before compiling.
    ``max_models`` bounds how many step models stay compiled (least recently used goes first);
    ``call_batch`` runs a larger ``x`` in pieces of that size, the last one padded, so that one
    compiled batch size serves a step-major sampler (every sample of a chunk through step k's model,
    then step k+1's).
    """

    def __init__(self, export_dir: str | Path, precision: str = "f32", threads: int = 0,
                 max_models: int | None = None, call_batch: int | None = None) -> None:
        require_openvino()
        self.dir = Path(export_dir)
        manifest = self.dir / "export.json"
        if not manifest.is_file():
            raise UserError(
                f"no export.json in {self.dir}. Fix: point export.dir at a folder written by task=export."
            )
        self.manifest = json.loads(manifest.read_text())
        self.precision, self.threads = precision, threads
        self.max_models, self.call_batch = max_models, call_batch
        self.step_to_model = {}
        for k, m in enumerate(self.manifest["models"]):
            for s in m["steps"] or []:
                self.step_to_model[int(s)] = k
        ranges = self.manifest.get("step_ranges")
        self.ranges = load_step_ranges(self.dir / ranges) if ranges else None
        self._compiled: dict[tuple[int, int], Any] = {}  # insertion order = use order (LRU)
        self.stats = {"compiles": 0, "compile_s": 0.0}

    @property
    def timesteps(self) -> list[int] | None:
        return self.manifest.get("timesteps")

    @property
    def per_step(self) -> bool:
        return len(self.manifest["models"]) > 1

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
        import time

        key = (k, batch)
        if key in self._compiled:
            self._compiled[key] = self._compiled.pop(key)  # most recently used
            return self._compiled[key]
        models = list(dict.fromkeys(i for i, _ in self._compiled))
        if self.max_models and k not in models and len(models) >= self.max_models:
            for old in [key_ for key_ in self._compiled if key_[0] == models[0]]:
                del self._compiled[old]
        t0 = time.perf_counter()
        entry = self.manifest["models"][k]
        row = entry.get("ranges")
        model = read_step_model(self.dir / entry["xml"], self.ranges if row is not None else None, int(row or 0))
        self._compiled[key] = compile_model(model, self.precision, self.threads, batch)
        self.stats["compiles"] += 1
        self.stats["compile_s"] = round(self.stats["compile_s"] + time.perf_counter() - t0, 3)
        return self._compiled[key]

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any = None) -> Any:
        import torch

        from tfmq_exp.quant.steps import current_step

        step = current_step()
        k = self._model_index(step)
        n, b = x.shape[0], self.call_batch or x.shape[0]
        outs = []
        for i in range(0, n, b):
            xs, ts = x[i:i + b], t[i:i + b]
            cs = None if encoder_hidden_states is None else encoder_hidden_states[i:i + b]
            pad = b - xs.shape[0]
            if pad:  # the last piece: repeat its first row up to the compiled batch, drop the extra outputs
                xs, ts = _pad(xs, pad), _pad(ts, pad)
                cs = None if cs is None else _pad(cs, pad)
            cm = self.compiled(k, b)
            feeds = {"sample": xs.detach().float().cpu().numpy(), "timestep": ts.detach().long().cpu().numpy(),
                     "step": np.array(step or 0, dtype=np.int64),
                     "encoder_hidden_states": None if cs is None else cs.detach().float().cpu().numpy()}
            names = {nm for inp in cm.inputs for nm in inp.get_names()}
            out = cm({nm: v for nm, v in feeds.items() if nm in names and v is not None})
            outs.append(torch.from_numpy(np.asarray(out[cm.outputs[0]]))[: b - pad])
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(x.device)


def _pad(a: Any, pad: int) -> Any:
    import torch

    return torch.cat([a, a[:1].expand(pad, *a.shape[1:])])

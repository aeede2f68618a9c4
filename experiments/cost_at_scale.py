"""Cost at scale: what quantizing the paper's full-size models costs, projected from measured parts.

For each paper model (conf/model/<name>.yaml, ``source: original``) the UNet is built with random weights
from the authors' config by the project's converters, then this script measures:

* the FP forward of one denoising step (batch 1, 2 under classifier-free guidance) and of a batch of
  ``recon.batch_size`` samples;
* per method (brecq, qdiff, tfmq) and per representative unit (the first resnet block at the highest
  resolution, the mid-block resnet, and for conditional models the first and the mid-block transformer block),
  quantized with the method's real recipe: seconds per 100 AdaRound iterations (``engine.optimize_rounding``
  on the unit's real input, captured by a hook on one batch-1 forward and repeated to the reconstruction
  batch), seconds per 100 LSQ iterations (brecq, qdiff: ``engine.optimize_steps``), the loop's memory and the
  tensors autograd keeps for the backward pass;
* for tfmq on the whole quantized UNet: the weight-range search (``init_weight_ranges``), TIAR per 100
  iterations (``pipeline.tiar_stage``) and FSC's two forwards of one step (``pipeline.fsc_stage``: the init
  forward of 16 samples with its Lp searches, then one EMA forward of 16);
* FLOPs, input and output size and forward position of every reconstruction unit (one batch-1 forward);
* the memory of the calibration record, the weight pool and the largest unit cache at the official sizes.

It then projects the whole quantization of each paper preset (``experiment=paper/<short>_w4a8`` composed with
each method's recipe) at the official budget. The projection is arithmetic on measured parts, not a run:
docs/cost_at_scale.md gives the formula and its assumptions (unit time affine in the unit's FLOPs, fitted per
unit kind through the two measured units of that kind).

    OMP_NUM_THREADS=1 python experiments/cost_at_scale.py --models ldm_bedroom sd14 --shrink 16 --latent-size 16
    python experiments/cost_at_scale.py --device cuda --out experiments/results/cost_at_scale_cuda.json \\
        --compare experiments/results/cost_at_scale.json

Writes the JSON given by --out (default experiments/results/cost_at_scale.json) and a Markdown table beside it
(.md). ``--shrink F`` divides the channel widths (model_channels / F, rounded to a multiple of 32) and
``--latent-size`` replaces the latent size: both are for smoke checks, and their tables say so.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import platform
import resource
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
DEFAULT_OUT = ROOT / "experiments" / "results" / "cost_at_scale.json"

# model option -> short name of its paper preset (conf/experiment/paper/<short>_w4a8.yaml)
PRESETS = {
    "ddim_cifar10": "cifar10",
    "ldm_bedroom": "bedroom",
    "ldm_churches": "churches",
    "ldm_celebahq": "celebahq",
    "ldm_ffhq": "ffhq",
    "ldm_cin256": "imagenet",
    "sd14": "sd",
}
METHODS = ("brecq", "qdiff", "tfmq")
BITS = "w4a8"
PROBE_T = 500  # the time step of every measured forward
KINDS = ("resnet", "transformer")  # fit families: transformer blocks, and everything else
NOTE = ("projection from measured parts, not a measured end-to-end run: unit loops are timed for a few "
        "iterations and scaled to the budget (docs/cost_at_scale.md)")


class CostError(Exception):
    """A problem the user can fix (bad model name, no CUDA): one line, exit code 2."""


# ---------------------------------------------------------------- small helpers


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def release_memory(dev: torch.device) -> None:
    """Hand freed memory back before the next phase sizes its batches on what is available: the heap keeps
    freed small blocks resident until ``malloc_trim`` (on CUDA the allocator's cache until ``empty_cache``)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


class Peak:
    """Memory of a block: CUDA max_memory_allocated above what was allocated before; on a CPU the growth of the
    process's resident size, polled every 5 ms (the max RSS would miss a block below an earlier phase's high-water
    mark; large tensors are unmapped when freed), from a baseline taken after ``release_memory``: blocks an earlier
    phase freed but the heap kept resident would otherwise be reused unseen (SD v1.4's FSC probe, run after TIAR,
    measured 220 KB per sample)."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _resident_bytes())

    def __enter__(self) -> Peak:
        _sync(self.dev)
        release_memory(self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
            return self
        self.base = self.peak = _resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.dev)
        if self.dev.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.dev)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _resident_bytes())

    def report(self) -> dict[str, Any]:
        kind = "cuda_max_allocated_growth" if self.dev.type == "cuda" else "cpu_rss_sampled_growth_trimmed"
        return {"peak_growth_bytes": int(self.peak - self.base), "memory_kind": kind}


def _timed(fn, dev: torch.device, reps: int) -> float:  # noqa: ANN001
    """Mean seconds of ``reps`` calls of ``fn``."""
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / reps


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _cached(call: Any) -> list[torch.Tensor]:
    """The tensors of a ``recon.capture.CachedCall`` (batched ones are wrapped, the rest kept as they are)."""
    out = []
    for v in [*call.args, *call.kwargs.values()]:
        v = v if torch.is_tensor(v) else getattr(v, "data", v)
        out += _tensors(v)
    return out


def _storages(tensors: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def saved_for_backward(fn, exclude: set[int]) -> int:  # noqa: ANN001
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()``'s graph, leaving out
    the storages in ``exclude`` (parameters, buffers: memory the unit holds anyway)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def saved_split(loss_of, exclude: set[int]) -> tuple[int, int]:  # noqa: ANN001
    """(fixed, per-sample) bytes autograd keeps for ``loss_of(n)``, from n = 1 and n = 2: the soft weights of
    AdaRound do not grow with the batch, the activations do."""
    one, two = saved_for_backward(lambda: loss_of(1), exclude), saved_for_backward(lambda: loss_of(2), exclude)
    per = max(0, two - one)
    return max(0, one - per), per


def _shell(name: str, module: nn.Module) -> nn.Module:
    """A bare module tree that holds ``module`` under its full name in the UNet, so name-based recipe rules
    (exact module names) apply to a copy of one unit as they apply in the whole model."""
    root = node = nn.Module()
    parts = name.split(".")
    for p in parts[:-1]:
        child = nn.Module()
        node.add_module(p, child)
        node = child
    node.add_module(parts[-1], module)
    return root


def _call(unit: nn.Module, args: list, kwargs: dict) -> torch.Tensor:
    out = unit(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- configs and budgets


def compose_presets(short: str) -> dict[str, Any]:
    """The paper preset under each method, as `python -m tfmq_exp experiment=paper/<short>_w4a8 quantizer=M`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tfmq_exp.config import register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return {m: compose(config_name="config", overrides=[f"experiment=paper/{short}_{BITS}", f"quantizer={m}"])
                for m in METHODS}


def budget_of(cfgs: dict[str, Any]) -> dict[str, Any]:
    """The official budget of one preset: steps, calibration record, pools, iterations, FSC and act-init sizes."""
    from omegaconf import OmegaConf

    from tfmq_exp.diffusion.sampling import ddim_timesteps
    from tfmq_exp.models.original import scheduler_from_params

    cfg = cfgs["tfmq"]
    s, mcfg = cfg.sampler, cfg.model
    params = OmegaConf.to_container(mcfg.original.params, resolve=True)
    n_train = int(scheduler_from_params(str(mcfg.original.kind), params)["num_train_timesteps"])
    if s.kind == "ddpm":
        timesteps = list(range(n_train))[::-1]
    else:
        timesteps = ddim_timesteps(n_train, int(s.steps), str(s.skip), int(s.timestep_offset), str(s.uniform_steps))
    steps = len(timesteps)
    guided = str(cfg.dataset.conditioning) != "none" and float(s.guidance) != 1.0
    n_traj = int(cfg.calib.n_trajectories)
    calls = steps + (1 if s.kind == "plms" else 0)  # PLMS: one extra call for the first step's improved Euler
    mode = str(cfg.calib.get("mode", "one_pass"))
    per_call = n_traj * (2 if guided else 1)  # sample forwards per model call over all trajectories
    forwards = {"one_pass": per_call * calls, "official": per_call * steps * (steps - 1) // 2}
    methods = {}
    for m, c in cfgs.items():
        q = c.quantizer
        methods[m] = {
            "pool_size": round(int(c.recon.pool_size) * float(OmegaConf.select(q, "options.pool_size_factor") or 1)),
            "calib_steps": int(OmegaConf.select(q, "options.calib_steps") or 16),
            "act_calib_samples": int(q.act_calib_samples),
            "running_stat": bool(OmegaConf.select(q, "options.running_stat") or False),
            "lsq": m != "tfmq" and bool(OmegaConf.select(q, "options.lsq", default=True)),
            "tiar": m == "tfmq" and bool(OmegaConf.select(q, "options.tiar", default=True)),
            "iters": int(c.recon.iters),
            "act_iters": int(c.recon.act_iters),
            "recon_batch": int(c.recon.batch_size),
        }
    q = cfgs["tfmq"].quantizer.options
    return {
        "preset": f"paper/{PRESETS[str(mcfg.name)]}_{BITS}",
        "sampler": {"kind": str(s.kind), "steps_asked": int(s.steps), "guidance": float(s.guidance)},
        "steps": steps,
        "model_calls_per_trajectory": calls,
        "guided": guided,
        "n_trajectories": n_traj,
        "calib_mode": mode,
        "record_sample_forwards": forwards,
        "recon_batch": int(cfg.recon.batch_size),
        "iters": int(cfg.recon.iters),
        "act_iters": int(cfg.recon.act_iters),
        "fsc_init_samples": int(q.fsc_init_samples),
        "fsc_batch_size": int(q.fsc_batch_size),
        "fsc_per_step": int(q.fsc_per_step),
        "fsc_momentum": float(q.fsc_momentum),
        "methods": methods,
    }


# ---------------------------------------------------------------- the architecture


def shrunk_width(ch: int, f: float) -> int:
    """``ch / f`` rounded to a multiple of 32 (GroupNorm's 32 groups), at least 32; ``f <= 1``: ``ch``."""
    return int(ch) if f <= 1 else max(32, int(round(ch / f / 32)) * 32)


def shrink_unet_params(params: dict[str, Any], kind: str, f: float) -> dict[str, Any]:
    """The authors' UNet params with the channel widths divided by ``f`` (heads kept valid)."""
    p = copy.deepcopy(params)
    if f <= 1:
        return p
    if kind == "ddim":
        p["model"]["ch"] = shrunk_width(p["model"]["ch"], f)
        return p
    p["model_channels"] = mc = shrunk_width(p["model_channels"], f)
    widths = [mc * m for m in p.get("channel_mult", (1, 2, 4, 8))]
    for key in ("num_head_channels", "num_heads"):  # a head width / head count must divide every width
        if p.get(key, -1) not in (-1, None):
            p[key] = math.gcd(int(p[key]), *widths)
    return p


@dataclass
class Spec:
    """What a forward of this UNet needs: latent shape, and the context (None: unconditional)."""

    channels: int
    size: int
    ctx_len: int | None
    ctx_dim: int | None


def build_unet(mcfg: Any, f: float) -> tuple[nn.Module, dict[str, Any]]:
    """The diffusers UNet of a ``source: original`` model config, random weights, built as the loader builds it."""
    from omegaconf import OmegaConf

    from tfmq_exp.models.convert import ddim_model, ldm_unet

    kind = str(mcfg.original.kind)
    params = OmegaConf.to_container(mcfg.original.params, resolve=True)
    torch.manual_seed(0)
    if kind == "ddim":
        p = shrink_unet_params(params, kind, f)
        unet, width = ddim_model.build(p), p["model"]["ch"]
    else:
        p = shrink_unet_params(params["unet_config"]["params"], kind, f)
        unet, width = ldm_unet.build(p), p["model_channels"]
    unet.eval().requires_grad_(False)
    return unet, {"unet_class": type(unet).__name__, "model_channels": int(width),
                  "parameters": sum(t.numel() for t in unet.parameters())}


def spec_of(mcfg: Any, unet: nn.Module, size: int | None) -> Spec:
    """Latent channels/size from the model config; the context of a conditional model: 77 CLIP text states
    (FrozenCLIPEmbedder) or the one class token of LDM's ClassEmbedder, as wide as the UNet's cross-attention."""
    cs = mcfg.original.params.get("cond_stage_config")
    target = "" if cs is None or isinstance(cs, str) else str(cs.get("target", ""))
    dim = getattr(unet.config, "cross_attention_dim", None)
    length = 77 if target.endswith("FrozenCLIPEmbedder") else 1 if target.endswith("ClassEmbedder") else None
    if length is not None and dim is None:
        raise CostError(f"model '{mcfg.name}' has a conditioning stage but its UNet has no cross-attention")
    return Spec(int(mcfg.channels), int(size or mcfg.image_size), length, int(dim) if length else None)


def make_batch(spec: Spec, b: int, dev: torch.device, seed: int = 0):  # noqa: ANN201
    """A Batch of ``b`` noisy latents at t = PROBE_T (with random contexts for conditional models)."""
    from tfmq_exp.diffusion.calib_pool import Batch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, spec.channels, spec.size, spec.size, generator=g)
    ctx = None if spec.ctx_len is None else torch.randn(b, spec.ctx_len, spec.ctx_dim, generator=g).to(dev)
    return Batch(x.to(dev), torch.full((b,), PROBE_T, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long),
                 ctx)


def unit_class(module: nn.Module) -> str:
    from tfmq_exp.models.adapters.base import diffusers_classes

    for label, cls in diffusers_classes().items():
        if isinstance(module, cls):
            return label
    return "layer"


def fit_kind(cls: str) -> str:
    return "transformer" if cls == "BasicTransformerBlock" else "resnet"


@torch.no_grad()
def profile_units(unet: nn.Module, spec: Spec, dev: torch.device) -> tuple[list[dict[str, Any]], int]:
    """Every reconstruction unit (and the time-embedding layers the baselines reconstruct): FLOPs, FLOPs of the
    forward before it, input and output bytes, all for one sample; plus the FLOPs of the whole forward."""
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    from tfmq_exp.diffusion.calib_pool import call_model
    from tfmq_exp.models import adapters

    mods = dict(unet.named_modules())
    names = [u.name for u in adapters.reconstruction_units(unet, order="registration")]
    names += [n for n in adapters.temporal_layer_names(unet) if not n.endswith("time_emb_proj") and n not in names]
    entries = {n: {"name": n, "class": unit_class(mods[n]), "flops": 0, "prefix_flops": 0, "in_bytes": 0,
                   "out_bytes": 0, "order": None} for n in names}
    # SDPA on a CPU runs an op FlopCounterMode does not know: count it with the SDPA formula
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        def sdpa(q, k, v, *_args, out_shape=None, **_kw):  # noqa: ANN001, ANN202 - shapes, by FlopCounterMode
            return flop_counter.sdpa_flop_count(q, k, v)

        mapping[cpu_sdpa] = sdpa
    fc = FlopCounterMode(display=False, custom_mapping=mapping)
    called: list[str] = []

    def pre(name: str):  # noqa: ANN202
        def hook(_m, args, kwargs):  # noqa: ANN001, ANN202
            e = entries[name]
            if e["order"] is None:
                e["order"], e["prefix_flops"] = len(called), int(fc.get_total_flops())
                e["in_bytes"] = sum(t.nbytes for t in _tensors([args, kwargs]) if t.dim() and t.shape[0] == 1)
                called.append(name)
        return hook

    def post(name: str):  # noqa: ANN202
        def hook(_m, _args, out):  # noqa: ANN001, ANN202
            if not entries[name]["out_bytes"]:
                entries[name]["out_bytes"] = int((out[0] if isinstance(out, tuple) else out).nbytes)
        return hook

    handles = []
    for n in names:
        handles.append(mods[n].register_forward_pre_hook(pre(n), with_kwargs=True))
        handles.append(mods[n].register_forward_hook(post(n)))
    try:
        with fc:
            call_model(unet, make_batch(spec, 1, dev))
    finally:
        for h in handles:
            h.remove()
    counts, root = fc.get_flop_counts(), type(unet).__name__
    for n, e in entries.items():
        e["flops"] = int(sum(counts.get(f"{root}.{n}", {}).values()))
    return list(entries.values()), int(fc.get_total_flops())


def representatives(unet: nn.Module) -> dict[str, str]:
    """The measured units: first resnet at the highest resolution, the mid-block resnet, and the first and the
    mid-block transformer blocks where there are transformer blocks."""
    from tfmq_exp.models.adapters.base import diffusers_classes, resnet_blocks

    reps = {"resnet_hi": resnet_blocks(unet)[0][0], "resnet_lo": "mid_block.resnets.0"}
    tbs = [n for n, m in unet.named_modules() if isinstance(m, diffusers_classes()["BasicTransformerBlock"])]
    if tbs:
        mid = [n for n in tbs if n.startswith("mid_block.")]
        reps["transformer_hi"], reps["transformer_lo"] = tbs[0], (mid[0] if mid else tbs[-1])
    return reps


# ---------------------------------------------------------------- the methods' recipes


def method_recipe(unet: nn.Module, method: str, qcfg: Any, origin: str):  # noqa: ANN201
    """The recipe, split points and attention-quantizer switch that ``reconstruction._prepare`` uses."""
    from tfmq_exp.methods.base import build_recipe
    from tfmq_exp.methods.reconstruction import _auto, _opt, _rule_options
    from tfmq_exp.models import adapters

    ctx = SimpleNamespace(quantizer=qcfg, origin=origin)
    recipe = build_recipe(qcfg)
    recipe.rules = adapters.adapter_for(unet).fp_rules(method, **_rule_options(ctx, method)) + recipe.rules
    split = method == "qdiff" and _auto(_opt(ctx, "split_shortcut", "auto"), origin != "ldm")
    splits = adapters.split_points(unet) if split else {}
    attention = recipe.act.enabled and bool(_opt(ctx, "quant_attention", method == "qdiff"))
    return recipe, splits, attention, int(_opt(ctx, "softmax_bits", 8))


def _attention_quantizers(model: nn.Module, recipe: Any, softmax_bits: int, origin: str) -> None:
    from tfmq_exp.models import adapters

    a = recipe.act
    adapters.install_attention_quantizers(model, a.n_bits, softmax_bits, False, init=a.init, symmetric=a.symmetric,
                                          softmax_always_zero=origin != "ddim", ema=a.ema)


def weight_units(unet: nn.Module, units: list[dict[str, Any]], recipe: Any, tiar: bool) -> list[str]:
    """Units the weight stage reconstructs: those with a layer whose weights the recipe quantizes. With TIAR
    (tfmq) the temporal layers are TIAR's: the time-embedding layer units drop out and each resnet's
    ``time_emb_proj`` does not count; the baselines reconstruct the time-embedding linears as layer units."""
    from tfmq_exp.models import adapters

    temporal = set(adapters.temporal_layer_names(unet))
    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    out = []
    for u in units:
        name = u["name"]
        if tiar and name in temporal:
            continue
        mine = [n for n in layers if (n == name or n.startswith(name + ".")) and not (tiar and n in temporal)]
        if any(p.wrap and p.quantize_weight and p.weight_bits < 32 for p in map(recipe.plan, mine)):
            out.append(name)
    return out


# ---------------------------------------------------------------- measurements


@dataclass
class Bench:
    unet: nn.Module
    spec: Spec
    dev: torch.device
    runner: Any
    iters: int
    reps: int
    mem_limit: int | None  # bytes; None: from what is free now


def _limit(b: Bench) -> int:
    if b.mem_limit:
        return b.mem_limit
    if b.dev.type == "cuda":
        return int(torch.cuda.mem_get_info(b.dev)[0] * 0.8)
    return int(_available_bytes() * 0.4)


def fitting_batch(batch: int, bytes_per_sample: int, limit: int, fixed: int = 0) -> int:
    """The reconstruction batch, halved until ``fixed + batch x bytes_per_sample`` fits ``limit`` (at least 1)."""
    b = batch
    while b > 1 and fixed + b * bytes_per_sample > limit:
        b = (b + 1) // 2
    return b


def capture(b: Bench, name: str):  # noqa: ANN201
    """The unit's inputs (args and kwargs) and its FP output on one batch-1 forward, by the engine's hooks."""
    from tfmq_exp.diffusion.calib_pool import call_model
    from tfmq_exp.recon.capture import capture_inputs, capture_outputs

    unit = b.unet.get_submodule(name)
    batch = make_batch(b.spec, 1, b.dev, seed=1)
    return (capture_inputs(b.unet, unit, [batch], call_model, b.dev),
            capture_outputs(b.unet, unit, [batch], call_model, b.dev))


def measure_unit(b: Bench, name: str, method: str, cfg: Any, origin: str, budget: dict[str, Any],
                 captured: Any) -> dict[str, Any]:
    """AdaRound (and LSQ for brecq/qdiff) of one quantized unit: K timed iterations after one warm-up, with the
    engine's own loops on the unit's captured input repeated to the reconstruction batch."""
    from tfmq_exp.methods.pipeline import set_quant_state, settings_from, unit_act_quantizers, weight_quantizers_of
    from tfmq_exp.models import adapters
    from tfmq_exp.quant.frozen import frozen_weights
    from tfmq_exp.quant.modules import quant_modules
    from tfmq_exp.quant.swap import init_weight_ranges, swap_modules
    from tfmq_exp.recon.engine import _as_buffer, _as_parameter, lp_loss, optimize_rounding, optimize_steps

    m = budget["methods"][method]
    batch = m["recon_batch"]
    recipe, splits, attention, softmax_bits = method_recipe(b.unet, method, cfg.quantizer, origin)
    shell = _shell(name, copy.deepcopy(b.unet.get_submodule(name)))
    swap_modules(shell, recipe, splits)
    init_weight_ranges(shell)
    if attention:
        _attention_quantizers(shell, recipe, softmax_bits, origin)
    unit = shell.get_submodule(name)
    exclude = set(adapters.temporal_layer_names(b.unet)) if m["tiar"] else set()
    layers = [q for n, q in quant_modules(unit) if f"{name}.{n}".rstrip(".") not in exclude and q.allow_weight_quant]
    out: dict[str, Any] = {"unit": name, "class": unit_class(unit), "layers": len(layers)}
    if not layers:
        return out
    inputs, targets = captured

    def loss_at(n: int, p: float = 2.0) -> torch.Tensor:
        idx = torch.zeros(n, dtype=torch.long)  # the captured sample, repeated: the engine's select + copy
        args, kwargs = inputs.select(idx, b.dev)
        return lp_loss(_call(unit, args, kwargs), targets[idx.to(targets.device)], p)

    cached = [*_cached(inputs), targets]
    held = _storages([*shell.parameters(), *shell.buffers(), *cached])
    io = sum(t.nbytes for t in cached)  # one sample's inputs and target
    base = settings_from(cfg.recon)

    def loop(run, saved: tuple[int, int], nb: int | None = None) -> dict[str, Any]:  # noqa: ANN001
        # the batch that fits: activations kept for backward, their gradients and temporaries (3x), inputs
        # and targets (2x); a smaller batch is timed and scaled linearly to the reconstruction batch
        nb = nb or fitting_batch(batch, 3 * saved[1] + 2 * io, _limit(b), 3 * saved[0])
        while True:
            s = replace(base, batch_size=nb, eval_samples=nb)
            try:
                run(replace(s, iters=1, act_iters=1), nb)  # warm-up
                with Peak(b.dev) as peak:
                    rep = run(replace(s, iters=b.iters, act_iters=b.iters), nb)
                break
            except torch.cuda.OutOfMemoryError:  # the estimate was short: half the batch, scaled as above
                if nb == 1:
                    raise
                torch.cuda.empty_cache()
                nb = (nb + 1) // 2
        return {"s_per_100": rep["wall_s"] / b.iters * 100 * batch / nb, "iters": b.iters, "batch": batch,
                "measured_batch": nb, "saved_for_backward_bytes": saved[0] + batch * saved[1], **peak.report(),
                "note": "" if nb == batch else f"measured at batch {nb} (memory guard), time scaled x{batch / nb:g}"}

    set_quant_state(shell, weight=True, act=False)
    qs = weight_quantizers_of(layers)
    saved = saved_split(lambda n: loss_at(n), held | _storages([q.alpha for q in qs]))
    out["adaround"] = loop(lambda s, nb: optimize_rounding(
        qs, lambda idx: loss_at(len(idx)), nb, s, b.runner, 0, desc=f"adaround {name}"), saved)
    if m["lsq"] and m["act_iters"] > 0 and recipe.act.enabled:
        nb = out["adaround"]["measured_batch"]
        set_quant_state(shell, weight=True, act=True)
        acts = [q for q in unit_act_quantizers(unit) if q.enabled]
        with torch.no_grad():  # activation init (each quantizer's init rule) on the unit's repeated input
            for q in acts:
                q.reset()
                q.observing, q.running_stat = True, False
            loss_at(min(nb, m["act_calib_samples"]))
            for q in acts:
                q.observing = False
        lqs = [q for q in acts if q.initialized and q.n_bits < 16]  # lsq_stage's choice
        if lqs:
            params = [_as_parameter(q) for q in lqs]
            saved = saved_split(lambda n: loss_at(n, base.act_p), held | _storages(params))
            for q in lqs:
                _as_buffer(q)
            with frozen_weights(shell):  # as lsq_stage: every rounding is final, the weights quantized once
                out["lsq"] = loop(lambda s, nb: optimize_steps(
                    lqs, lambda idx: loss_at(len(idx), s.act_p), nb, s, b.runner, 0, desc=f"lsq {name}"), saved,
                    min(nb, fitting_batch(batch, 3 * saved[1] + 2 * io, _limit(b), 3 * saved[0])))
    return out


@torch.no_grad()
def measure_forward(b: Bench, budget: dict[str, Any]) -> dict[str, Any]:
    """FP UNet forward: one denoising step of one image (the doubled batch under guidance) and a recon batch."""
    from tfmq_exp.diffusion.calib_pool import call_model

    step_b = 2 if budget["guided"] else 1
    rb = budget["recon_batch"]
    one, big = make_batch(b.spec, step_b, b.dev), make_batch(b.spec, rb, b.dev)
    call_model(b.unet, one)  # warm-up
    step_s = _timed(lambda: call_model(b.unet, one), b.dev, b.reps)
    if b.dev.type == "cuda":
        call_model(b.unet, big)
    with Peak(b.dev) as peak:
        big_s = _timed(lambda: call_model(b.unet, big), b.dev, b.reps)
    return {"step_batch": step_b, "step_s": step_s, "recon_batch": rb, "recon_batch_s": big_s,
            "per_sample_s": big_s / rb, "reps": b.reps, "recon_batch_memory": peak.report()}


def measure_tfmq_model(b: Bench, cfg: Any, origin: str, budget: dict[str, Any],
                       timesteps: list[int]) -> dict[str, Any]:
    """TFMQ-DM on the whole quantized UNet: weight ranges, TIAR iterations, one step of FSC."""
    from tfmq_exp.methods.pipeline import settings_from, tiar_stage
    from tfmq_exp.models import adapters
    from tfmq_exp.quant.swap import init_weight_ranges, swap_modules

    recipe, splits, attention, softmax_bits = method_recipe(b.unet, "tfmq", cfg.quantizer, origin)
    qmodel = copy.deepcopy(b.unet)
    swap_modules(qmodel, recipe, splits)
    _sync(b.dev)
    t0 = time.perf_counter()
    init_weight_ranges(qmodel)
    _sync(b.dev)
    out: dict[str, Any] = {"weight_ranges_s": time.perf_counter() - t0}
    if attention:
        _attention_quantizers(qmodel, recipe, softmax_bits, origin)
    batch = budget["methods"]["tfmq"]["recon_batch"]
    s = replace(settings_from(cfg.recon), batch_size=batch, eval_samples=batch)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(timesteps)[torch.randint(len(timesteps), (batch,), generator=g)]
    temporal = adapters.temporal_layer_names(qmodel)
    tiar_stage(qmodel, b.unet, temporal, t, replace(s, iters=1), b.runner, 0, adapters.tib_features)  # warm-up
    rep = tiar_stage(qmodel, b.unet, temporal, t, replace(s, iters=b.iters), b.runner, 0, adapters.tib_features)
    out["tiar"] = {"s_per_100": rep["wall_s"] / b.iters * 100, "iters": b.iters, "batch": batch}
    if recipe.act.enabled:
        out["fsc"] = measure_fsc(b, qmodel, budget, g)
    del qmodel
    return out


def measure_fsc(b: Bench, qmodel: nn.Module, budget: dict[str, Any], g: torch.Generator) -> dict[str, Any]:
    """One step of FSC on the whole quantized UNet: the init forward and one EMA mini-batch, timed apart.
    A probe at batch 1 gives the forward's memory per sample; where the official batch does not fit (SD v1.4's
    attention maps on a CPU) both run at a smaller batch and scale linearly to the official sizes."""
    from tfmq_exp.diffusion.calib_pool import CalibPool
    from tfmq_exp.methods.pipeline import all_act_quantizers, fsc_stage

    quantizers = all_act_quantizers(qmodel)

    def pool_of(n: int) -> CalibPool:
        x = torch.randn(n, b.spec.channels, b.spec.size, b.spec.size, generator=g)
        ctx_idx = contexts = None
        if b.spec.ctx_len is not None:  # entries alternate c, uc as a guided record's
            ctx_idx, contexts = torch.arange(n) % 2, torch.randn(2, b.spec.ctx_len, b.spec.ctx_dim, generator=g)
        return CalibPool(x, torch.full((n,), PROBE_T, dtype=torch.long), torch.zeros(n, dtype=torch.long), ctx_idx,
                         contexts)

    def run(n_init: int, n: int) -> list[float]:
        times: list[float] = []

        def start(_m, _a):  # noqa: ANN001, ANN202
            _sync(b.dev)
            times.append(-time.perf_counter())

        def stop(_m, _a, _o):  # noqa: ANN001, ANN202
            _sync(b.dev)
            times[-1] += time.perf_counter()

        hs = [qmodel.register_forward_pre_hook(start), qmodel.register_forward_hook(stop)]
        try:
            fsc_stage(qmodel, {0: pool_of(max(n_init, n))}, 1, quantizers, n_init, n, budget["fsc_momentum"], 0)
        finally:
            for h in hs:
                h.remove()
        return times

    with Peak(b.dev) as probe:  # also the warm-up
        run(1, 1)
    # the larger of two one-sample forwards (init, EMA); fixed part included
    per_sample = max(probe.report()["peak_growth_bytes"], 1)
    full_init, full_batch, limit = budget["fsc_init_samples"], budget["fsc_batch_size"], _limit(b)
    n, n_init = fitting_batch(full_batch, per_sample, limit), fitting_batch(full_init, per_sample, limit)
    with Peak(b.dev) as peak:
        times = run(n_init, n)
    init_s, ema = times[0], times[1:]
    ema_s = sum(ema) / len(ema)
    per_step = init_s * full_init / n_init + budget["fsc_per_step"] / n * ema_s
    return {"init_samples": n_init, "batch": n, "official_init_samples": full_init, "official_batch": full_batch,
            "scaled": n < full_batch or n_init < full_init, "init_s": init_s, "ema_s": ema_s, "per_step_s": per_step,
            "probe_peak_bytes_per_sample": per_sample, **peak.report()}


# ---------------------------------------------------------------- fits and the projection


def fit_line(points: list[tuple[float, float]]) -> dict[str, float]:
    """Seconds per 100 iterations as ``intercept_s + s_per_flop x FLOPs`` through the measured units of one kind:
    the line through two points (clipped so that neither coefficient is negative), proportional through one."""
    pts = sorted(points)
    if len(pts) == 1 or pts[0][0] == pts[-1][0]:
        f, t = pts[-1]
        return {"intercept_s": 0.0, "s_per_flop": t / f} if f else {"intercept_s": t, "s_per_flop": 0.0}
    (f0, t0), (f1, t1) = pts[0], pts[-1]
    a = (t1 - t0) / (f1 - f0)
    if a < 0:  # the small unit is no faster: a per-iteration cost that does not grow with FLOPs
        return {"intercept_s": (t0 + t1) / 2, "s_per_flop": 0.0}
    c = t0 - a * f0
    if c < 0:
        return {"intercept_s": 0.0, "s_per_flop": t1 / f1}
    return {"intercept_s": c, "s_per_flop": a}


def fits_of(measured: dict[str, Any], loop: str) -> dict[str, dict[str, float]]:
    out = {}
    for kind in KINDS:
        pts = [(u["flops"], u[loop]["s_per_100"]) for u in measured.values()
               if loop in u and fit_kind(u["class"]) == kind]
        if pts:
            out[kind] = fit_line(pts)
    if "resnet" in out and "transformer" not in out:
        out["transformer"] = out["resnet"]
    return out


def fitted_s_per_100(fit: dict[str, float], flops: float) -> float:
    return fit["intercept_s"] + fit["s_per_flop"] * flops


def project(entry: dict[str, Any], method: str, rates_from: str | None = None) -> dict[str, Any]:
    """Full quantization time of ``method`` at the preset's official budget, from the entry's measured parts
    (its AdaRound and LSQ loops at the fitted rates of ``rates_from``'s units, when given)."""
    b, m = entry["budget"], entry["methods"][method]
    bm = b["methods"][method]
    units = {u["name"]: u for u in entry["units"]}
    total_flops = entry["arch"]["forward_flops"]
    per_sample = entry["fp_forward"]["per_sample_s"]
    tf = entry["tfmq_model"]

    def fitted(loop: str) -> float:
        fit = entry["methods"][rates_from or method]["fits"][loop]
        return sum(fitted_s_per_100(fit[fit_kind(units[n]["class"])], units[n]["flops"]) for n in m["weight_units"])

    # one pass of unit caching: per unit, its inputs (the model up to the unit) and its FP target (up to and
    # through it) over the whole pool, at the FP per-sample forward time scaled by the FLOPs share
    share = sum(2 * units[n]["prefix_flops"] + units[n]["flops"] for n in m["weight_units"]) / total_flops
    capture_pass = bm["pool_size"] * per_sample * share
    lsq = bm["lsq"] and bm["act_iters"] > 0 and "lsq" in m["fits"]
    # the LSQ stage's FP inputs and targets: one pass up to and through each unit (none for the units whose
    # weight-stage capture fits in recon.keep_fp_gb, which at these pool sizes holds few: not counted)
    lsq_share = sum(units[n]["prefix_flops"] + units[n]["flops"] for n in m["weight_units"]) / total_flops
    parts = {
        "adaround_s": bm["iters"] / 100 * fitted("adaround"),
        "lsq_s": bm["act_iters"] / 100 * fitted("lsq") if lsq else 0.0,
        "captures_s": capture_pass + (bm["pool_size"] * per_sample * lsq_share if lsq else 0.0),
        "tiar_s": bm["iters"] / 100 * tf["tiar"]["s_per_100"] if bm["tiar"] else 0.0,
        "fsc_s": b["steps"] * tf["fsc"]["per_step_s"] if method == "tfmq" and "fsc" in tf else 0.0,
        "act_init_s": 0.0,
        "weight_ranges_s": tf["weight_ranges_s"],
        "calib_record_s": b["record_sample_forwards"][b["calib_mode"]] * per_sample,
    }
    if method != "tfmq" and "fsc" in tf:  # init on act_calib_samples, then the optional EMA over the pool
        f = tf["fsc"]
        parts["act_init_s"] = f["init_s"] * bm["act_calib_samples"] / f["init_samples"]
        if bm["running_stat"]:
            parts["act_init_s"] += bm["pool_size"] / f["batch"] * f["ema_s"]
    return {"parts": parts, "total_s": sum(parts.values()), "capture_share": share}


def project_all(entry: dict[str, Any]) -> None:
    """Every method's projection, and TFMQ-DM's again with its AdaRound units at BRECQ's fitted rates: the same
    weight-only AdaRound on (nearly) the same blocks, so the gap between the two is timing noise of the few
    iterations each loop was timed for, which the TFMQ-DM / Q-Diffusion ratio should be read with."""
    for method in entry["methods"]:
        entry["methods"][method]["projection"] = project(entry, method)
    if {"tfmq", "brecq"} <= set(entry["methods"]):
        entry["methods"]["tfmq"]["projection"]["total_s_at_brecq_rates"] = project(entry, "tfmq", "brecq")["total_s"]


def memory_of(entry: dict[str, Any], spec: Spec) -> dict[str, Any]:
    """Record (S x N x C x H x W float32, contexts (N + 1) x L x D), weight pool and largest unit cache sizes."""
    b = entry["budget"]
    sample = spec.channels * spec.size * spec.size * 4
    ctx = 0 if spec.ctx_len is None else (b["n_trajectories"] + 1) * spec.ctx_len * spec.ctx_dim * 4
    units = {u["name"]: u for u in entry["units"]}
    out = {"record_bytes": b["steps"] * b["n_trajectories"] * sample, "record_context_bytes": ctx, "methods": {}}
    for method, m in entry["methods"].items():
        pool = b["methods"][method]["pool_size"]
        big = max(m["weight_units"], key=lambda n: units[n]["in_bytes"] + units[n]["out_bytes"])
        out["methods"][method] = {
            "weight_pool_bytes": pool * (sample + 3 * 8),  # x, and t / step / context index as int64
            "largest_unit_cache": {"unit": big, "bytes": pool * (units[big]["in_bytes"] + units[big]["out_bytes"])},
        }
    return out


# ---------------------------------------------------------------- one model


MEASURED = ("arch", "units", "fp_forward", "tfmq_model")  # what a model with the same measurement key reuses


def measurement_key(cfgs: dict[str, Any], budget: dict[str, Any], args: argparse.Namespace) -> str:
    """Everything the measurements depend on: the UNet params and conditioning, the latent, the sizes,
    the methods' quantizer configs and reconstruction settings, and guidance (the FP step's batch).
    LSUN-Bedrooms, CelebA-HQ and FFHQ share it: one architecture, one recipe per method."""
    from omegaconf import OmegaConf

    m = cfgs["tfmq"].model
    params = OmegaConf.to_container(m.original.params, resolve=True)
    return json.dumps({
        "kind": str(m.original.kind), "origin": str(m.origin), "channels": int(m.channels),
        "image_size": int(m.image_size), "unet": params.get("unet_config", params.get("model")),
        "cond": str(params.get("cond_stage_config")), "shrink": args.shrink, "latent_size": args.latent_size,
        "quantizers": {k: OmegaConf.to_container(c.quantizer, resolve=True) for k, c in cfgs.items()},
        "recon": {k: OmegaConf.to_container(c.recon, resolve=True) for k, c in cfgs.items()},
        "guided": budget["guided"],
    }, sort_keys=True, default=str)


def reuse(name: str, budget: dict[str, Any], src_name: str, src: dict[str, Any]) -> dict[str, Any]:
    """The entry of a model whose measurements equal ``src``'s (same key): its own budget and projection."""
    entry = {"budget": budget, "measured_as": src_name, **copy.deepcopy({k: src[k] for k in MEASURED}),
             "methods": {m: copy.deepcopy({k: v for k, v in e.items() if k != "projection"})
                         for m, e in src["methods"].items()}}
    arch = entry["arch"]
    ctx = arch["context"] or [None, None]
    entry["memory"] = memory_of(entry, Spec(arch["latent"][0], arch["latent"][1], ctx[0], ctx[1]))
    project_all(entry)
    entry["measure_wall_s"] = 0.0
    print(f"[{name}] same architecture, recipes and sizes as {src_name}: its measurements, this preset's budget",
          flush=True)
    return entry


def run_model(name: str, args: argparse.Namespace, dev: torch.device, runner: Any,
              done: dict[str, tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Measure one paper model (or reuse an earlier model's measurements with the same key) and project."""
    from tfmq_exp.diffusion.sampling import ddim_timesteps
    from tfmq_exp.models.original import scheduler_from_params

    t_start = time.perf_counter()
    cfgs = compose_presets(PRESETS[name])
    budget = budget_of(cfgs)
    mkey = measurement_key(cfgs, budget, args)
    if done is not None and mkey in done:
        return reuse(name, budget, *done[mkey])
    mcfg = cfgs["tfmq"].model
    origin = str(mcfg.origin)
    unet, arch = build_unet(mcfg, args.shrink)
    unet.to(dev)
    spec = spec_of(mcfg, unet, args.latent_size)
    if spec.size % 2 ** (len(unet.config.block_out_channels) - 1):
        raise CostError(f"--latent-size {spec.size} does not halve {len(unet.config.block_out_channels) - 1} times "
                        f"for '{name}'")
    print(f"[{name}] {arch['unet_class']}, {arch['parameters'] / 1e6:.1f} M parameters, latent "
          f"{spec.channels}x{spec.size}x{spec.size}", flush=True)
    bench = Bench(unet, spec, dev, runner, args.iters, args.reps,
                  int(args.mem_limit_gb * 2**30) if args.mem_limit_gb else None)
    units, flops = profile_units(unet, spec, dev)
    arch.update({"latent": [spec.channels, spec.size, spec.size], "forward_flops": flops,
                 "context": None if spec.ctx_len is None else [spec.ctx_len, spec.ctx_dim]})
    entry: dict[str, Any] = {"budget": budget, "arch": arch, "units": units, "methods": {}}
    by_name = {u["name"]: u for u in units}
    # the whole-model measurements first, while the process holds only the FP UNet (3.4 GB for SD v1.4): after
    # SD v1.4's unit loops it held 16.4 GB even after release_memory, too much for its FSC forwards
    entry["fp_forward"] = measure_forward(bench, budget)
    print(f"[{name}] FP step {entry['fp_forward']['step_s']:.3g} s, {entry['fp_forward']['per_sample_s']:.3g} s per "
          f"sample at batch {budget['recon_batch']}", flush=True)
    params = mcfg.original.params
    from omegaconf import OmegaConf

    n_train = int(scheduler_from_params(str(mcfg.original.kind), OmegaConf.to_container(params, resolve=True))
                  ["num_train_timesteps"])
    s = cfgs["tfmq"].sampler
    timesteps = ddim_timesteps(n_train, int(s.steps), str(s.skip), int(s.timestep_offset), str(s.uniform_steps))
    entry["tfmq_model"] = measure_tfmq_model(bench, cfgs["tfmq"], origin, budget, timesteps)
    print(f"[{name}] weight ranges {entry['tfmq_model']['weight_ranges_s']:.3g} s, FSC step "
          f"{entry['tfmq_model'].get('fsc', {}).get('per_step_s', float('nan')):.3g} s", flush=True)
    release_memory(dev)
    reps = representatives(unet)
    captured = {key: capture(bench, n) for key, n in reps.items()}
    for method in METHODS:
        qcfg = cfgs[method].quantizer
        recipe, *_ = method_recipe(unet, method, qcfg, origin)
        tiar = budget["methods"][method]["tiar"]
        m: dict[str, Any] = {"weight_units": weight_units(unet, units, recipe, tiar), "measured": {}}
        for key, n in reps.items():
            t0 = time.perf_counter()
            res = measure_unit(bench, n, method, cfgs[method], origin, budget, captured[key])
            res["flops"] = by_name[n]["flops"]
            m["measured"][key] = res
            print(f"[{name}] {method:5s} {key:14s} {n}: AdaRound "
                  f"{res.get('adaround', {}).get('s_per_100', float('nan')):.3g} s/100 it "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        m["fits"] = {loop: fits_of(m["measured"], loop) for loop in ("adaround", "lsq")}
        if not m["fits"]["lsq"]:
            del m["fits"]["lsq"]
        entry["methods"][method] = m
    entry["memory"] = memory_of(entry, spec)
    project_all(entry)
    entry["measure_wall_s"] = time.perf_counter() - t_start
    if done is not None:
        done[mkey] = (name, entry)
    del bench, unet
    return entry


# ---------------------------------------------------------------- tables


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f}" if n < 10 * 2**30 else f"{n / 2**30:.0f}"


def _label(res: dict[str, Any]) -> str:
    return f"{res['device_name']}, {res['threads']} thread{'s' if res['threads'] != 1 else ''}"


def shrunk_warning(res: dict[str, Any]) -> str | None:
    if res["shrink"] > 1 or res.get("latent_size"):
        what = [f"channels / {res['shrink']:g}"] if res["shrink"] > 1 else []
        what += [f"latent {res['latent_size']}x{res['latent_size']}"] if res.get("latent_size") else []
        return f"**Shrunk ({', '.join(what)}), not a real-size figure.**"
    return None


def tables(res: dict[str, Any], others: list[dict[str, Any]] = ()) -> str:
    created = ", ".join(r["created"] for r in res.get("runs", [])) or res["created"]
    lines = ["# Cost at scale: the paper presets at the official budget", "",
             f"Device: {_label(res)}; torch {res['torch']}; {created}; K = {res['iters']} timed iterations per "
             "unit loop.", "", f"Every total is a {NOTE}."]
    if shrunk_warning(res):
        lines += ["", shrunk_warning(res)]
    lines += ["", "## Projected quantization time", "",
              "| model (preset) | method | units | AdaRound | LSQ | TIAR | FSC | act. init | unit captures | "
              "weight ranges | calib. record | **total** |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in res["models"].items():
        for method, m in e["methods"].items():
            p = m["projection"]["parts"]
            cells = [p[k] for k in ("adaround_s", "lsq_s", "tiar_s", "fsc_s", "act_init_s", "captures_s",
                                    "weight_ranges_s", "calib_record_s")]
            lines.append(f"| {name} ({e['budget']['preset']}) | {method} | {len(m['weight_units'])} | "
                         + " | ".join("-" if c == 0 else _dur(c) for c in cells)
                         + f" | **{_dur(m['projection']['total_s'])}** |")
    ratios = [(name, e["methods"]) for name, e in res["models"].items()
              if "total_s_at_brecq_rates" in e["methods"].get("tfmq", {}).get("projection", {})
              and "qdiff" in e["methods"]]
    if ratios:
        lines += ["", "## TFMQ-DM / Q-Diffusion", "",
                  "With TFMQ-DM's AdaRound units at BRECQ's fitted rates (the same weight-only AdaRound on nearly the "
                  "same blocks; BRECQ's resnet units also hold their time-embedding projection) beside the ratio "
                  "from its own rates: the difference is mostly the timing noise of the few iterations each unit "
                  "loop was timed for.", "",
                  "| model | ratio | with BRECQ's unit rates |", "|---|---|---|"]
        for name, ms in ratios:
            qd, tf = ms["qdiff"]["projection"]["total_s"], ms["tfmq"]["projection"]
            lines.append(f"| {name} | {tf['total_s'] / qd:.2f} | {tf['total_s_at_brecq_rates'] / qd:.2f} |")
    if others:
        runs = [res, *others]
        lines += ["", "## Projected totals by device", "",
                  "| model | method | " + " | ".join(_label(r) + (" (shrunk)" if shrunk_warning(r) else "")
                                                    for r in runs) + " |",
                  "|---|---|" + "---|" * len(runs)]
        names = list(dict.fromkeys(n for r in runs for n in r["models"]))
        for name in names:
            for method in METHODS:
                cells = []
                for r in runs:
                    e = r["models"].get(name)
                    cells.append(_dur(e["methods"][method]["projection"]["total_s"]) if e else "-")
                lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    header = ["model", "params (M)", "FP step (batch)", "FP per sample @ recon batch",
              "resnet unit AdaRound s/100 it (brecq / qdiff / tfmq)",
              "its AdaRound memory MB, kept for backward / measured (tfmq)",
              "transformer unit AdaRound s/100 it (brecq / qdiff / tfmq)", "TIAR s/100 it",
              "FSC init / EMA forward (16 each unless noted)", "record GB", "weight pool GB (tfmq)",
              "largest unit cache GB (tfmq)"]
    lines += ["", "## Measured parts", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, e in res["models"].items():
        fp, tf, mem = e["fp_forward"], e["tfmq_model"], e["memory"]

        def per100(key: str, e: dict = e) -> str:
            vals = [e["methods"][m]["measured"].get(key, {}).get("adaround", {}).get("s_per_100") for m in METHODS]
            return "-" if all(v is None for v in vals) else " / ".join("-" if v is None else f"{v:.3g}" for v in vals)

        rn = e["methods"]["tfmq"]["measured"]["resnet_hi"].get("adaround", {})
        fsc = tf.get("fsc")
        at = f" (at {fsc['init_samples']} / {fsc['batch']})" if fsc and fsc.get("scaled") else ""
        tm = mem["methods"]["tfmq"]
        cells = [
            name, f"{e['arch']['parameters'] / 1e6:.0f}", f"{fp['step_s']:.3g} s ({fp['step_batch']})",
            f"{fp['per_sample_s']:.3g} s", per100("resnet_hi"),
            "{:.0f} / {:.0f}".format(rn.get("saved_for_backward_bytes", 0) / 2**20,
                                     rn.get("peak_growth_bytes", 0) / 2**20),
            per100("transformer_hi"), f"{tf['tiar']['s_per_100']:.3g}",
            "-" if not fsc else "{:.3g} / {:.3g} s{}".format(fsc["init_s"], fsc["ema_s"], at),
            _gb(mem["record_bytes"] + mem["record_context_bytes"]), _gb(tm["weight_pool_bytes"]),
            _gb(tm["largest_unit_cache"]["bytes"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    measured = ("CUDA max_memory_allocated above what was allocated before the loop" if res["device"].startswith("cuda")
                else "the growth of the process's resident size, polled every 5 ms, over a baseline taken after "
                     "handing freed heap back (`memory_kind` in the JSON says what earlier runs measured: "
                     "`cpu_maxrss_growth (coarse)`, 0 when an earlier phase went higher; `cpu_rss_sampled_growth`, "
                     "short by whatever heap an earlier phase or the warm-up freed and the block reused)")
    lines += ["", "Resnet unit: the first resnet block at the highest resolution; transformer unit: the first "
              "transformer block. AdaRound memory: the tensors autograd keeps for the backward pass at the "
              f"reconstruction batch (counted with saved-tensor hooks), and measured: {measured}. Unit cache: the "
              "pool's inputs and FP targets of the largest unit, which the weight stage keeps on the device "
              "(recon.cache_on=device).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(PRESETS), help=f"default: all ({' '.join(PRESETS)})")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations of every unit loop, after one warm-up")
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions of every full-UNet FP forward")
    ap.add_argument("--shrink", type=float, default=1.0, help="divide the channel widths (smoke checks only)")
    ap.add_argument("--latent-size", type=int, default=None, help="replace the latent size (smoke checks only)")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="memory a unit loop may use; a larger loop runs at a smaller batch and is scaled "
                         "(default: 40%% of the free RAM, 80%% of the free GPU memory)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the Markdown table goes beside it")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="instead of measuring: join the models of earlier runs (same device and settings) into "
                         "--out and its table")
    ap.add_argument("--compare", type=Path, nargs="*", default=[],
                    help="result JSONs of other devices, shown beside this run's totals")
    return ap.parse_args(argv)


def check(args: argparse.Namespace) -> torch.device:
    unknown = [m for m in args.models if m not in PRESETS]
    if unknown:
        raise CostError(f"unknown model {', '.join(map(repr, unknown))}: choose from {', '.join(PRESETS)}")
    if args.iters < 1 or args.reps < 1 or args.shrink < 1:
        raise CostError("--iters and --reps must be at least 1 and --shrink at least 1")
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise CostError(f"--device {args.device}: use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CostError(f"--device {args.device}: no CUDA device here")
    if dev.type not in ("cpu", "cuda"):
        raise CostError(f"--device {args.device}: use cpu or cuda[:N]")
    for p in args.compare:
        if not p.is_file():
            raise CostError(f"--compare {p}: no such file")
    return dev


def merge(paths: list[Path]) -> dict[str, Any]:
    """Runs of a few models each, made one after another, as one result: their models joined (a later run's
    model replaces an earlier one's; a merged file brings its run history), each projection recomputed from
    its measured parts; refused when device, threads, shrink or iterations differ."""
    runs = [json.loads(p.read_text()) for p in paths]
    keys = ("device", "device_name", "threads", "shrink", "latent_size", "iters", "bits")
    for p, r in zip(paths[1:], runs[1:]):
        diff = [k for k in keys if r.get(k) != runs[0].get(k)]
        if diff:
            raise CostError(f"--merge {p}: {', '.join(diff)} differ from {paths[0]}; merge runs of one setting only")
    history = [h for r in runs for h in r.get("runs") or [{"created": r["created"], "models": list(r["models"])}]]
    res = dict(runs[0], models={}, runs=history)
    for r in runs:
        res["models"].update(r["models"])
    for entry in res["models"].values():  # projections by the current formula, from the measured parts
        project_all(entry)
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.merge:
        try:
            missing = [p for p in args.merge if not p.is_file()]
            if missing:
                raise CostError(f"--merge {missing[0]}: no such file")
            res = merge(args.merge)
        except CostError as err:
            print(f"cost_at_scale: error: {err}", file=sys.stderr)
            return 2
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        args.out.with_suffix(".md").write_text(tables(res))
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
        return 0
    try:
        dev = check(args)
    except CostError as err:
        print(f"cost_at_scale: error: {err}", file=sys.stderr)
        return 2
    import diffusers

    from tfmq_exp.recon.engine import FabricRunner

    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    runner = FabricRunner("cuda" if dev.type == "cuda" else "cpu", [dev.index or 0] if dev.type == "cuda" else 1)
    res: dict[str, Any] = {
        "what": NOTE,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu"),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "bits": BITS,
        "shrink": args.shrink,
        "latent_size": args.latent_size,
        "iters": args.iters,
        "reps": args.reps,
        "models": {},
    }
    if dev.type == "cpu":
        res["device_name"] = f"CPU ({_cpu_model()})"
    done: dict[str, tuple[str, dict[str, Any]]] = {}
    try:
        for name in args.models:
            res["models"][name] = run_model(name, args, dev, runner, done)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    except CostError as err:
        print(f"cost_at_scale: error: {err}", file=sys.stderr)
        return 2
    others = [json.loads(p.read_text()) for p in args.compare]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    md = tables(res, others)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())

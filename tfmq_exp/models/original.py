"""The paper's models from their original checkpoints, converted to diffusers modules.

``model.source: original`` (conf/model/ldm_*.yaml, sd14.yaml, ddim_cifar10.yaml). The model's
``original`` node holds the ``params`` of the authors' yaml, the expected file names and where
the authors publish them. ``model.pretrained`` may name

* an original checkpoint file (``.ckpt``/``.pth``/``.pt``, read with ``weights_only=True``, or
  ``.safetensors``), converted by :mod:`tfmq_exp.models.convert`;
* a folder holding one of the expected file names (e.g. latent-diffusion's ``models/ldm/lsun_beds256``);
* a local diffusers folder or a hub id (loaded with ``from_pretrained``, for users who are online).

Without ``model.pretrained`` the expected names are searched in ``paths.models``. A latent
model brings its first stage (``VQModel``/``AutoencoderKL``) and, when conditional, its
conditioning stage (:class:`~tfmq_exp.models.convert.class_embedder.ClassEmbedder` or the CLIP
text encoder); see docs/models.md.
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tfmq_exp.errors import UserError
from tfmq_exp.models.convert import class_embedder, clip_text, ddim_model, first_stage, ldm_unet
from tfmq_exp.models.convert.keymap import load_converted, strip_prefix
from tfmq_exp.models.loader import LoadedModel

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors")
UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."


@dataclass
class OriginalModel(LoadedModel):
    """A :class:`LoadedModel` with the latent model's other stages (``None`` for pixel models)."""

    first_stage: torch.nn.Module | None = None  # VQModel / AutoencoderKL: decodes the UNet's latents
    cond_stage: torch.nn.Module | None = None  # ClassEmbedder / CLIPTextModel: conditioning -> context
    scale_factor: float = 1.0  # latents = scale_factor * first-stage latents (LDM's z scaling)
    source_path: str = ""  # the checkpoint, folder or hub id the weights came from
    # where the CLIP tokenizer of a text model may come from, tried in order: (folder or hub id, subfolder)
    tokenizer_sources: list[tuple[str, str | None]] = field(default_factory=list)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The CLIP tokenizer (not part of an original checkpoint), loaded the first time prompts are encoded."""
        if self.text_encoder is None:
            return None
        from transformers import CLIPTokenizer

        tried = []
        for ref, sub in self.tokenizer_sources:
            try:
                return CLIPTokenizer.from_pretrained(ref, subfolder=sub or "")
            except (OSError, ValueError, TypeError):
                tried.append(f"{ref}/{sub}" if sub else ref)
        raise UserError(
            f"cannot load the CLIP tokenizer of model '{self.name}' (tried: {', '.join(tried) or 'nothing'}). "
            "Fix: set model.original.tokenizer=PATH to a local copy of the tokenizer files (vocab.json, "
            "merges.txt), or run where the hub is reachable."
        )

    # the names the latent pipeline reads on a LoadedModel (as model=mnist_ldm provides them)
    @property
    def vae(self) -> torch.nn.Module | None:
        return self.first_stage

    @property
    def scaling_factor(self) -> float:
        return self.scale_factor

    @property
    def class_embedder(self) -> torch.nn.Module | None:
        return self.cond_stage if isinstance(self.cond_stage, class_embedder.ClassEmbedder) else None

    @property
    def text_encoder(self) -> torch.nn.Module | None:
        return None if self.cond_stage is None or self.class_embedder is not None else self.cond_stage


# ---------------------------------------------------------------- reading checkpoints

# Training bookkeeping that Lightning pickles into its checkpoints (older versions key the callback
# states by the callback class, e.g. ModelCheckpoint); never needed for the weights.
BOOKKEEPING = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


class _Bookkeeping:
    """Inert stand-in for a Lightning class named in a checkpoint: accepts any state and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: torch.load reports what it refuses
        return []


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with Lightning's bookkeeping classes read as inert stubs."""
    names = _unsafe_globals(path)
    stubs = [(_Bookkeeping, n) for n in names if n.startswith(BOOKKEEPING)]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        other = [n for n in names if not n.startswith(BOOKKEEPING)]
        if not other:
            raise
        raise UserError(
            f"cannot read checkpoint {path}: it pickles objects other than tensors ({', '.join(other[:3])}), "
            "which safe loading refuses. Fix: save its state_dict as .safetensors (docs/models.md)."
        ) from None


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` from an original checkpoint file.

    Lightning checkpoints keep the weights under ``state_dict`` (the training bookkeeping they also
    pickle is read as inert stubs, see :func:`_torch_load`); ddim's training checkpoints are a
    list whose last entry is the EMA shadow (keys without ``module.``); ``module.`` prefixes of
    DataParallel are removed.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = _torch_load(path)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"cannot read checkpoint {path}: {first}. Fix: check the file is complete; a checkpoint that pickles "
            "objects besides tensors can be saved as .safetensors once (docs/models.md)."
        ) from None
    if isinstance(obj, (list, tuple)):  # ddim training checkpoint: [model, optimizer, epoch, step, (ema)]
        obj = obj[4] if len(obj) > 4 and isinstance(obj[4], Mapping) else obj[0]
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"checkpoint {path} holds no state dict. Fix: pass the model's original checkpoint file.")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module.")
    return state


def ema_unet_state(state: Mapping[str, torch.Tensor], unet_keys) -> dict[str, torch.Tensor]:
    """The LitEma shadow of the UNet: ``model_ema.`` + ('diffusion_model.' + key) without dots."""
    out = {}
    for key in unet_keys:
        ema_key = EMA_PREFIX + ("diffusion_model." + key).replace(".", "")
        if ema_key not in state:
            raise UserError(
                f"the checkpoint has no EMA weights ({ema_key} missing). Fix: set model.original.use_ema=false."
            )
        out[key] = state[ema_key]
    return out


# ---------------------------------------------------------------- finding the file


def _describe(orig: Mapping[str, Any]) -> str:
    return f"{orig.get('what', 'the original checkpoint')}, published at {orig.get('published', 'its authors site')}"


def _search(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def resolve(cfg: Any) -> tuple[str, str]:
    """``("checkpoint", path)`` or ``("diffusers", folder or hub id)`` for this model config."""
    orig = cfg.original
    names = [str(n) for n in orig.get("files", [])]
    ref = cfg.get("pretrained")
    if ref:
        p = Path(str(ref)).expanduser()
        if p.is_file():
            return "checkpoint", str(p)
        if p.is_dir():
            found = _search(p, names + ["model.ckpt", "model.safetensors"])
            if found:
                return "checkpoint", str(found)
            return "diffusers", str(p)
        if p.suffix in CHECKPOINT_SUFFIXES or str(ref).startswith((".", "/", "~")) or str(ref).count("/") != 1:
            raise UserError(
                f"model.pretrained={ref}: no such file or folder; model '{cfg.name}' expects {names[0]} "
                f"({_describe(orig)}). Fix: pass the path of that file, a diffusers folder or a hub id."
            )
        return "diffusers", str(ref)
    folder = cfg.get("models_dir")
    if folder:
        found = _search(Path(str(folder)).expanduser(), names)
        if found:
            return "checkpoint", str(found)
    where = f"not in paths.models={folder} (looked for {', '.join(names)})" if folder else "paths.models is not set"
    hub = f", or model.pretrained={orig.hub} when online" if orig.get("hub") else ""
    raise UserError(
        f"model '{cfg.name}' needs {names[0]} ({_describe(orig)}); {where}. Fix: set model.pretrained=PATH to "
        f"the file, or paths.models=DIR holding it{hub} (docs/models.md)."
    )


# ---------------------------------------------------------------- building


def _stage_kind(stage: Any) -> str | None:
    if stage is None or isinstance(stage, str):
        return None  # "__is_unconditional__" / "__is_first_stage__"
    target = str(stage.get("target", ""))
    for suffix, kind in (("VQModelInterface", "vq"), ("VQModel", "vq"), ("AutoencoderKL", "kl"),
                         ("ClassEmbedder", "class"), ("FrozenCLIPEmbedder", "clip")):
        if target.endswith(suffix):
            return kind
    raise UserError(f"unsupported original stage '{target}'. Fix: use one of the shipped model options.")


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def scheduler_from_params(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The DDPM training schedule of the original config, in diffusers scheduler terms.

    LDM's ``linear`` schedule is linear in sqrt(beta) (diffusers ``scaled_linear``); ddim's is
    linear in beta.
    """
    if kind == "ddim":
        d = params["diffusion"]
        if d.get("beta_schedule", "linear") != "linear":
            raise UserError(f"unsupported ddim beta_schedule '{d['beta_schedule']}'. Fix: use 'linear'.")
        return {"num_train_timesteps": int(d["num_diffusion_timesteps"]), "beta_schedule": "linear",
                "beta_start": float(d["beta_start"]), "beta_end": float(d["beta_end"]), "prediction_type": "epsilon"}
    if params.get("beta_schedule", "linear") != "linear" or params.get("parameterization", "eps") != "eps":
        raise UserError("only LDM's 'linear' beta schedule with eps parameterization is supported")
    return {"num_train_timesteps": int(params.get("timesteps", 1000)), "beta_schedule": "scaled_linear",
            "beta_start": float(params.get("linear_start", 1e-4)), "beta_end": float(params.get("linear_end", 2e-2)),
            "prediction_type": "epsilon"}


def load_original(cfg: Any, *, weights: bool = True) -> OriginalModel:
    """Load the model of a ``source: original`` config (see the module docstring)."""
    orig = cfg.original
    if not orig or orig.get("kind") not in ("ldm", "ddim"):
        raise UserError(f"model '{cfg.name}': model.original.kind must be 'ldm' or 'ddim' for source 'original'.")
    kind = str(orig.kind)
    params = _plain(orig.params)
    sched = dict(cfg.scheduler) if cfg.get("scheduler") else scheduler_from_params(kind, params)
    if not weights:
        return _assemble(cfg, kind, params, sched, None, "")
    how, ref = resolve(cfg)
    if how == "diffusers":
        return _from_diffusers(cfg, kind, params, sched, ref)
    return _assemble(cfg, kind, params, sched, read_checkpoint(Path(ref)), ref)


def _assemble(cfg: Any, kind: str, params: dict, sched: dict, state: dict | None, ref: str) -> OriginalModel:
    """Build (and, given a state dict, fill) every stage of the model."""
    what = f"checkpoint {ref} for model '{cfg.name}'"
    loading = state is not None
    # with weights to load, the diffusers modules (which hold no buffers) are built on the meta
    # device and take the converted tensors: no random initialisation of ~10^9 parameters first
    device = torch.device("meta") if loading else torch.get_default_device()
    if kind == "ddim":
        with device:
            unet = ddim_model.build(params)
        if loading:
            load_converted(unet, ddim_model.convert(_expect(state, "", what), params), assign=True)
        return _result(cfg, unet, sched, ref)
    unet_params = params["unet_config"]["params"]
    fs_cfg, cs_cfg = params.get("first_stage_config"), params.get("cond_stage_config")
    fs_kind, cs_kind = _stage_kind(fs_cfg), _stage_kind(cs_cfg)
    scale = float(params.get("scale_factor", 1.0))
    with device:
        unet = ldm_unet.build(unet_params)
        fs = first_stage.build(fs_cfg["params"], fs_kind, scale) if fs_kind else None
        cs = class_embedder.build(cs_cfg["params"]) if cs_kind == "class" else None
    if cs_kind == "clip":
        cs = clip_text.build()  # has a non-persistent buffer (position ids): built on the real device
    if loading:
        unet_state = _expect(state, UNET_PREFIX, what)
        if cfg.original.get("use_ema"):
            unet_state = ema_unet_state(state, list(unet_state))
        load_converted(unet, ldm_unet.convert(unet_state, unet_params), assign=True)
        if "scale_factor" in state:  # scale_by_std: the value fitted in training is a buffer
            scale = float(state["scale_factor"])
        if fs is not None:
            fs_state = strip_prefix(state, FIRST_STAGE_PREFIX) or _first_stage_file(cfg)
            load_converted(fs, first_stage.convert(fs_state, fs_cfg["params"], fs_kind), assign=True)
            fs.register_to_config(scaling_factor=scale)
        if cs_kind == "class":
            cs_state = class_embedder.convert(_expect(state, COND_STAGE_PREFIX, what), cs_cfg["params"])
            load_converted(cs, cs_state, assign=True)
        elif cs_kind == "clip":
            load_converted(cs, clip_text.convert(_expect(state, COND_STAGE_PREFIX, what)))
    for module in (fs, cs):
        if module is not None:
            module.eval().requires_grad_(False)
    return _result(cfg, unet, sched, ref, fs, cs, scale)


def _expect(state: Mapping[str, torch.Tensor], prefix: str, what: str) -> dict[str, torch.Tensor]:
    part = strip_prefix(state, prefix)
    if not part:
        raise UserError(f"{what} has no '{prefix}*' weights. Fix: pass the checkpoint this model option describes.")
    return part


def _first_stage_file(cfg: Any) -> dict[str, torch.Tensor]:
    """The standalone first-stage checkpoint, for an LDM checkpoint saved without ``first_stage_model.*``."""
    fs = cfg.original.get("first_stage") or {}
    names = [str(n) for n in fs.get("files", [])]
    folder = cfg.get("models_dir")
    found = _search(Path(str(folder)).expanduser(), names) if folder and names else None
    if found is None:
        raise UserError(
            f"the checkpoint of model '{cfg.name}' has no first_stage_model.* weights and {names[0] if names else '?'} "
            f"({_describe(fs)}) is not in paths.models={folder}. Fix: put it there, or use the full LDM checkpoint."
        )
    return read_checkpoint(found)


def _result(cfg, unet, sched, ref, fs=None, cs=None, scale=1.0, tokenizers=()) -> OriginalModel:
    unet.eval().requires_grad_(False)
    sources = list(tokenizers)
    if cfg.original.get("tokenizer"):  # FrozenCLIPEmbedder's tokenizer: a hub id or a local copy
        sources.append((str(cfg.original.tokenizer), None))
    return OriginalModel(unet, sched, cfg.name, int(cfg.image_size), int(cfg.channels), first_stage=fs,
                         cond_stage=cs, scale_factor=scale, source_path=ref, tokenizer_sources=sources)


def _from_diffusers(cfg: Any, kind: str, params: dict, sched: dict, ref: str) -> OriginalModel:
    """A diffusers copy of the model (local folder or hub id): UNet, first stage, text encoder."""
    import diffusers

    parts = dict(cfg.original.get("diffusers_parts") or {})
    flat = Path(ref).expanduser().joinpath("config.json").is_file()
    unet_sub = None if flat else (cfg.get("subfolder") or parts.get("unet", "unet"))

    def load(cls, sub):
        try:
            return cls.from_pretrained(ref, subfolder=sub)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(
                f"cannot load '{ref}' ({cls.__name__}{f', {sub}/' if sub else ''}): {first}. Fix: pass "
                f"model.pretrained=PATH to the original checkpoint ({_describe(cfg.original)}) or a diffusers folder."
            ) from None

    unet = load(getattr(diffusers, cfg.get("unet_class", "UNet2DModel")), unet_sub)
    fs = cs = None
    scale = float(params.get("scale_factor", 1.0)) if kind == "ldm" else 1.0
    if kind == "ldm" and not flat:
        fs_kind = _stage_kind(params.get("first_stage_config"))
        if fs_kind and parts.get("first_stage"):
            fs = load(diffusers.VQModel if fs_kind == "vq" else diffusers.AutoencoderKL, parts["first_stage"])
            if fs_kind == "kl":  # SD's vae config carries 0.18215; LDM's VQ latents are not scaled
                scale = float(fs.config.get("scaling_factor", scale))
            fs.register_to_config(scaling_factor=scale)
        if _stage_kind(params.get("cond_stage_config")) == "clip" and parts.get("cond_stage"):
            from transformers import CLIPTextModel

            cs = load(CLIPTextModel, parts["cond_stage"])
    for module in (fs, cs):
        if module is not None:
            module.eval().requires_grad_(False)
    # a pipeline folder carries its tokenizer (tokenizer/); the configured one is the fallback
    tokenizers = [(ref, parts.get("tokenizer", "tokenizer"))] if cs is not None else []
    return _result(cfg, unet, sched, ref, fs, cs, scale, tokenizers)

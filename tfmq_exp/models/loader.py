"""Build a diffusion model from its config: the embedded MNIST UNet, or any diffusers UNet.

``source: embedded`` builds ``UNet2DModel(**arch)`` and loads a safetensors file (the
committed asset by default). ``source: diffusers`` calls ``from_pretrained`` on a local
folder or a hub id, so the same code serves a user who is online.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from tfmq_exp.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class LoadedModel:
    """A denoiser with the training noise schedule it was trained under."""

    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    name: str
    image_size: int
    channels: int


def resolve_weights_path(path: str | None, default_name: str) -> Path:
    """The weights file to load: an explicit path, else the committed asset."""
    p = Path(path).expanduser() if path else ASSETS / default_name
    if not p.is_file():
        raise UserError(
            f"model weights not found: {p}. Fix: pass model.weights=PATH to a .safetensors file, "
            "or train it with `python -m tfmq_exp task=train model=mnist`."
        )
    return p


def load_safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict, turning a damaged file into a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(
            f"cannot read weights file {path}: not a valid safetensors file ({err}). "
            "Fix: restore the file (git checkout it) or retrain with `python -m tfmq_exp task=train`."
        ) from None


def require_finite_state(state: dict[str, torch.Tensor], where: str) -> None:
    """NaN/Inf weights poison every later number: stop at load time, naming the first bad tensor."""
    from tfmq_exp.checks import require_finite

    for name, value in state.items():
        require_finite(value, f"{where}: tensor '{name}'",
                       "restore the weights file (git checkout it) or retrain with `python -m tfmq_exp task=train`")


def build_unet(arch: dict[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DModel

    arch = dict(arch)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in arch:
            arch[key] = tuple(arch[key])
    return UNet2DModel(**arch)


def load_model(cfg: Any, *, weights: bool = True) -> LoadedModel:
    """Load the model described by the ``model`` config group (see conf/model/)."""
    source = cfg.source
    sched = dict(cfg.scheduler) if cfg.get("scheduler") else {}
    if source == "embedded" and cfg.get("first_stage"):  # latent model (model=mnist_ldm): UNet, VAE, embedder
        from tfmq_exp.models.mnist_ldm import loaded_model

        return loaded_model(cfg, weights=weights)
    if source == "embedded":
        unet = build_unet(dict(cfg.arch))
        if weights:
            path = resolve_weights_path(cfg.get("weights"), f"{cfg.name}_unet.safetensors")
            state = load_safetensors_state(path)
            require_finite_state(state, f"weights file {path}")
            try:
                unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0]
                raise UserError(
                    f"weights file {path} does not match model '{cfg.name}': {first}. "
                    "Fix: point model.weights at weights trained for this architecture."
                ) from None
    elif source == "diffusers":
        unet = _from_pretrained(cfg)
        require_finite_state(unet.state_dict(), f"model '{cfg.pretrained}'")
        if not sched:
            sched = _scheduler_from_pretrained(cfg)
    elif source == "original":  # an original CompVis/ddim checkpoint, a diffusers folder or a hub id
        from tfmq_exp.models.original import load_original

        return load_original(cfg, weights=weights)
    else:
        raise UserError(f"unknown model.source '{source}'. Fix: use 'embedded', 'diffusers' or 'original'.")
    unet.eval().requires_grad_(False)
    return LoadedModel(unet, sched, cfg.name, int(cfg.image_size), int(cfg.channels))


def _from_pretrained(cfg: Any) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, cfg.get("unet_class", "UNet2DModel"))
    try:
        return cls.from_pretrained(cfg.pretrained, subfolder=cfg.get("subfolder"))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load model '{cfg.pretrained}': {first}. Fix: pass model.pretrained=PATH to a "
            "local diffusers folder, or run where the hub is reachable."
        ) from None


def _scheduler_from_pretrained(cfg: Any) -> dict[str, Any]:
    try:
        return dict(DDPMScheduler.load_config(cfg.pretrained, subfolder=cfg.get("scheduler_subfolder")))
    except (OSError, ValueError):
        return {}

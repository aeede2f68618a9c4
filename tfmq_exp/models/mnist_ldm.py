"""The embedded class-conditional latent model (``model=mnist_ldm``): LDM cin256 at toy scale.

Three parts, built from conf/model/mnist_ldm.yaml and stored together in one safetensors file
(keys prefixed ``unet.``, ``vae.``, ``class_embedder.``; the latent scale in the metadata):

* an ``AutoencoderKL`` (1x28x28 in [-1, 1] <-> 4x7x7 latent), decoded in full precision;
* a ``ClassEmbedder``: ``nn.Embedding(n_classes + 1, dim)``, the last id being the null class of
  classifier-free guidance, giving one context token (B, 1, dim) as LDM's ClassEmbedder does;
* a ``UNet2DConditionModel`` that sees the class only through cross-attention (no class embedding
  in the time embedding), so the quantization methods meet the same structure as on cin256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tfmq_exp.errors import UserError

ASSET = "mnist_ldm.safetensors"
PARTS = ("unet", "vae", "class_embedder")


class ClassEmbedder(nn.Module):
    """Class ids (B,) -> context (B, 1, dim); id ``null_class`` is the unconditional token."""

    def __init__(self, n_classes: int, embed_dim: int, null_class: int | None = None):
        super().__init__()
        self.n_classes = int(n_classes)
        self.null_class = int(n_classes if null_class is None else null_class)
        self.embedding = nn.Embedding(self.n_classes + 1, int(embed_dim))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.n_classes):
            raise UserError(
                f"class id out of range: got {labels.min().item()}..{labels.max().item()}, the model knows "
                f"0..{self.n_classes - 1} and the null class {self.null_class}. Fix: pass ids in that range."
            )
        return self.embedding(labels)[:, None, :]


def _tuples(arch: Any) -> dict[str, Any]:
    arch = dict(arch)
    for key, value in arch.items():
        if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
            arch[key] = tuple(value)
    return arch


def build_vae(arch: Any) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_tuples(arch))


def build_cond_unet(arch: Any) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_tuples(arch))


def build_class_embedder(spec: Any) -> ClassEmbedder:
    return ClassEmbedder(spec["n_classes"], spec["embed_dim"], spec.get("null_class"))


def build_parts(cfg: Any) -> dict[str, nn.Module]:
    """Fresh (random) modules of the model config ``cfg`` (the ``model`` group)."""
    if not cfg.get("first_stage") or not cfg.get("class_embedder"):
        raise UserError(f"model '{cfg.name}' has no first_stage/class_embedder section. Fix: use model=mnist_ldm.")
    emb = build_class_embedder(cfg.class_embedder)
    if int(cfg.arch.get("cross_attention_dim", -1)) != emb.embedding.embedding_dim:
        raise UserError(
            f"model.arch.cross_attention_dim ({cfg.arch.get('cross_attention_dim')}) must equal "
            f"model.class_embedder.embed_dim ({emb.embedding.embedding_dim}). Fix: set both to the same width."
        )
    return {"unet": build_cond_unet(cfg.arch), "vae": build_vae(cfg.first_stage.arch), "class_embedder": emb}


def save_mnist_ldm(path: Path, parts: dict[str, nn.Module], scaling_factor: float, meta: dict[str, str]) -> None:
    """Write the three parts as one fp16 safetensors file (atomically), the latent scale in the metadata."""
    from safetensors.torch import save_file

    state = {f"{name}.{k}": v.detach().half().contiguous() for name in PARTS
             for k, v in parts[name].state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={**meta, "scaling_factor": repr(float(scaling_factor))})
    tmp.replace(path)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    from tfmq_exp.models.loader import load_safetensors_state

    state = load_safetensors_state(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return state, meta


def load_mnist_ldm(cfg: Any, *, weights: bool = True) -> tuple[nn.Module, nn.Module, ClassEmbedder, float, dict]:
    """(unet, vae, class_embedder, scaling_factor, scheduler_config) of the ``model`` config, in eval mode.

    Latents for the UNet are ``vae.encode(x).latent_dist.sample() * scaling_factor``; images are
    ``vae.decode(z / scaling_factor).sample`` in [-1, 1].
    """
    from tfmq_exp.models.loader import require_finite_state, resolve_weights_path

    parts = build_parts(cfg)
    scale = 1.0
    if weights:
        path = resolve_weights_path(cfg.get("weights"), ASSET)
        state, meta = _read(path)
        require_finite_state(state, f"weights file {path}")
        if "scaling_factor" not in meta:
            raise UserError(f"weights file {path} has no 'scaling_factor' in its metadata. Fix: retrain with "
                            "`python -m tfmq_exp task=train model=mnist_ldm`.")
        scale = float(meta["scaling_factor"])
        for name in PARTS:
            sub = {k[len(name) + 1:]: v.float() for k, v in state.items() if k.startswith(name + ".")}
            try:
                parts[name].load_state_dict(sub, strict=True)
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0]
                raise UserError(f"weights file {path} does not match model '{cfg.name}' ({name}): {first}. "
                                "Fix: point model.weights at weights trained for this architecture.") from None
    for m in parts.values():
        m.eval().requires_grad_(False)
    sched = dict(cfg.scheduler) if cfg.get("scheduler") else {}
    return parts["unet"], parts["vae"], parts["class_embedder"], scale, sched


def loaded_model(cfg: Any, *, weights: bool = True):
    """The UNet as the loader's ``LoadedModel`` (the denoiser on the 4x7x7 latent); VAE, embedder and
    latent scale ride along as attributes ``vae``, ``class_embedder``, ``scaling_factor``."""
    from tfmq_exp.models.loader import LoadedModel

    unet, vae, emb, scale, sched = load_mnist_ldm(cfg, weights=weights)
    model = LoadedModel(unet, sched, cfg.name, int(cfg.image_size), int(cfg.channels))
    model.vae, model.class_embedder, model.scaling_factor = vae, emb, scale
    return model


@torch.no_grad()
def encode(vae: nn.Module, x: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None):
    """Images in [-1, 1] -> scaled latents (a posterior sample, as LDM trains on)."""
    dist = vae.encode(x).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype)
    return (dist.mean + dist.std * noise.to(dist.mean.device)) * scaling_factor


@torch.no_grad()
def decode(vae: nn.Module, z: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (clamped)."""
    return vae.decode(z / scaling_factor).sample.clamp(-1, 1)

"""Every key of every full-size original checkpoint listing is consumed, on the meta device.

The listings (fixtures' fullsize_*.json) hold the key names and shapes of the real models; the
state dicts are built from them as meta tensors, so no memory is allocated and nothing is
downloaded. ``KeyMap.finish`` fails on any unused original key, unfilled target key or shape
mismatch; the parameter count of the converted module must equal the original's.
"""

from __future__ import annotations

import pytest
import torch
from original_fixtures import fullsize

from tfmq_exp.models.convert import class_embedder, clip_text, ddim_model, first_stage, ldm_unet
from tfmq_exp.models.convert.keymap import shapes_of, strip_prefix
from tfmq_exp.models.original import ema_unet_state

LISTINGS = [
    ("lsun_bedrooms-ldm-vq-4_unet", ldm_unet, (), "UNet2DModel"),
    ("lsun_churches-ldm-kl-8_unet", ldm_unet, (), "UNet2DModel"),
    ("celebahq-ldm-vq-4_unet", ldm_unet, (), "UNet2DModel"),
    ("ffhq-ldm-vq-4_unet", ldm_unet, (), "UNet2DModel"),
    ("cin256-v2_unet", ldm_unet, (), "UNet2DConditionModel"),
    ("sd-v1_unet", ldm_unet, (), "UNet2DConditionModel"),
    ("cin256-v2_class_embedder", class_embedder, (), "ClassEmbedder"),
    ("vq-f4_first_stage", first_stage, ("vq",), "VQModel"),
    ("kl-f8_first_stage", first_stage, ("kl",), "AutoencoderKL"),
    ("ddim_cifar10", ddim_model, (), "UNet2DModel"),
]


def meta_state(listing: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in listing["state_dict"].items()}


@pytest.mark.parametrize(("name", "family", "extra", "cls"), LISTINGS, ids=[x[0] for x in LISTINGS])
def test_every_fullsize_key_is_consumed_and_parameter_count_matches(name, family, extra, cls):
    listing = fullsize(name)
    with torch.device("meta"):
        module = family.build(listing["constructor_params"], *extra)
    assert type(module).__name__ == cls
    state = strip_prefix(meta_state(listing), listing["key_prefix"])
    assert len(state) == listing["num_state_dict_tensors"]
    converted = family.convert(state, listing["constructor_params"], *extra, target_shapes=shapes_of(module))
    assert converted.keys() == module.state_dict().keys()
    assert sum(p.numel() for p in module.parameters()) == listing["num_parameters"]


def test_churches_attention_keeps_8_heads_at_every_width():
    listing = fullsize("lsun_churches-ldm-kl-8_unet")
    with torch.device("meta"):
        unet = ldm_unet.build(listing["constructor_params"])
    from diffusers.models.attention_processor import Attention

    attns = [m for m in unet.modules() if isinstance(m, Attention)]
    assert len(attns) == 4 * 2 + 1 + 4 * 3  # levels 0-3 down (2 each), mid, levels 0-3 up (3 each)
    assert {a.heads for a in attns} == {8}
    assert {a.to_q.out_features: a.scale for a in attns} == {c: (c // 8) ** -0.5 for c in (192, 384, 768)}


@pytest.mark.parametrize("name", ["lsun_bedrooms-ldm-vq-4_unet", "lsun_churches-ldm-kl-8_unet"])
def test_ema_names_cover_every_unet_parameter(name):
    listing = fullsize(name)
    listed = listing["known_extras_not_generated"]["groups"]["model_ema"]["keys"]
    ckpt = {k: torch.empty(s, device="meta") for k, (s, _) in listed.items()}
    unet_keys = list(strip_prefix(listing["state_dict"], listing["key_prefix"]))
    ema = ema_unet_state(ckpt, unet_keys)
    assert len(ema) == len(unet_keys) == len(listed) - 2  # minus model_ema.decay / num_updates


def test_clip_text_encoder_keys_of_the_2022_layout_are_consumed():
    with torch.device("meta"):
        model = clip_text.build()
    ckpt = {"transformer.text_model." + k: v for k, v in model.state_dict().items()}
    ckpt["transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")
    converted = clip_text.convert(ckpt, target_shapes=shapes_of(model))
    assert converted.keys() == model.state_dict().keys()
    assert sum(p.numel() for p in model.parameters()) == 123_060_480  # CLIP ViT-L/14 text tower


WHOLE = {  # model option -> (UNet listing, first-stage listing, cond-stage listing or "clip")
    "ldm_bedroom": ("lsun_bedrooms-ldm-vq-4_unet", "vq-f4_first_stage", None),
    "ldm_churches": ("lsun_churches-ldm-kl-8_unet", "kl-f8_first_stage", None),
    "ldm_celebahq": ("celebahq-ldm-vq-4_unet", "vq-f4_first_stage", None),
    "ldm_ffhq": ("ffhq-ldm-vq-4_unet", "vq-f4_first_stage", None),
    "ldm_cin256": ("cin256-v2_unet", "vq-f4_first_stage", "cin256-v2_class_embedder"),
    "sd14": ("sd-v1_unet", "kl-f8_first_stage", "clip"),
}


def whole_checkpoint(unet_name: str, fs_name: str, cs_name: str | None) -> dict[str, torch.Tensor]:
    """A full-size LatentDiffusion state dict on the meta device: every listed key and every known extra."""
    unet = fullsize(unet_name)
    state = meta_state(unet)
    for group, spec in unet["known_extras_not_generated"]["groups"].items():
        for key, (shape, _) in spec.get("keys", {}).items():
            state[key] = torch.tensor(0.25) if key == "scale_factor" else torch.empty(shape, device="meta")
        if group == "first_stage_model":
            assert spec["identical_keys_and_shapes_to"] == f"fullsize_{fs_name}.json"
    state.update(meta_state(fullsize(fs_name)))
    if cs_name == "clip":
        with torch.device("meta"):
            clip = clip_text.build()
        state.update({"cond_stage_model.transformer.text_model." + k: v for k, v in clip.state_dict().items()})
    elif cs_name:
        state.update(meta_state(fullsize(cs_name)))
    return state


@pytest.mark.parametrize("name", list(WHOLE))
def test_whole_fullsize_checkpoint_loads_into_every_stage(make_cfg, name, monkeypatch):
    from tfmq_exp.models import original

    cfg = make_cfg(f"model={name}").model
    state = whole_checkpoint(*WHOLE[name])
    monkeypatch.setattr(original, "resolve", lambda cfg: ("checkpoint", "full.ckpt"))
    monkeypatch.setattr(original, "read_checkpoint", lambda path: state)
    with torch.device("meta"):
        model = original.load_original(cfg)
    expected = {n: fullsize(n)["num_parameters"] for n in WHOLE[name] if n and n != "clip"}
    got = [sum(p.numel() for p in m.parameters()) for m in (model.unet, model.vae, model.cond_stage) if m is not None]
    assert got[: len(expected)] == list(expected.values())
    assert model.scale_factor == {"ldm_churches": 0.25, "sd14": 0.18215}.get(name, 1.0)  # churches: the buffer
    assert (model.cond_stage is None) == (WHOLE[name][2] is None)


def test_ema_weights_of_a_fullsize_checkpoint(make_cfg, monkeypatch):
    """use_ema takes LitEma's shadow: one real tensor among meta ones shows which copy was taken."""
    from tfmq_exp.models import original

    state = whole_checkpoint(*WHOLE["ldm_bedroom"])
    state["model_ema.diffusion_modeltime_embed0weight"] = torch.full((896, 224), 7.0)
    monkeypatch.setattr(original, "resolve", lambda cfg: ("checkpoint", "full.ckpt"))
    monkeypatch.setattr(original, "read_checkpoint", lambda path: state)
    for use_ema, device in (("true", "cpu"), ("false", "meta")):
        cfg = make_cfg("model=ldm_bedroom", f"model.original.use_ema={use_ema}").model
        with torch.device("meta"):
            weight = original.load_original(cfg).unet.time_embedding.linear_1.weight
        assert weight.device.type == device
        if use_ema == "true":
            assert torch.equal(weight, torch.full((896, 224), 7.0))

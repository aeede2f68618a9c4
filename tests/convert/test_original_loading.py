"""Loading an original checkpoint file end to end: file formats, prefixes, search, errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from original_fixtures import close, original_config, tiny
from safetensors.torch import save_file

from tfmq_exp.errors import UserError
from tfmq_exp.models.loader import load_model
from tfmq_exp.models.original import OriginalModel, read_checkpoint, resolve, scheduler_from_params


def _tiny_ldm_checkpoint() -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """The tiny conditional UNet + ClassEmbedder + VQ first stage as one LatentDiffusion state dict."""
    unet_state, unet_io, unet_meta = tiny("ldm_cond_unet_A")
    vq_state, vq_io, vq_meta = tiny("vq_f4_A")
    state = {**unet_state, **vq_state, "betas": torch.linspace(1e-4, 2e-2, 1000)}
    params = {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": original_config(unet_meta)},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                               "params": original_config(vq_meta)},
        "cond_stage_config": original_config(unet_meta, "cond_stage_config"),
    }
    return state, params, unet_io, vq_io


def _cfg(params: dict, **model) -> OmegaConf:
    node = {
        "name": "tiny_cin", "family": "unet2d_condition", "source": "original", "pretrained": None,
        "models_dir": None, "subfolder": None, "unet_class": "UNet2DConditionModel", "image_size": 16,
        "channels": 3, "scheduler": {},
        "original": {"kind": "ldm", "what": "the tiny test model", "published": "nowhere (made by the test)",
                     "files": ["ldm/tiny/model.ckpt", "tiny.safetensors"], "use_ema": False, "params": params},
    }
    node.update(model)
    return OmegaConf.create(node)


def _check_outputs(model: OriginalModel, unet_io: dict, vq_io: dict) -> None:
    with torch.no_grad():
        context = model.cond_stage(unet_io["class_label"])
        out = model.unet(unet_io["x"], unet_io["timesteps"], encoder_hidden_states=context).sample
        dec = model.first_stage.decode(vq_io["z"]).sample
    close(out, unet_io["out"])
    close(dec, vq_io["dec"])


def test_lightning_ckpt_loads_through_load_model(tmp_path):
    state, params, unet_io, vq_io = _tiny_ldm_checkpoint()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, path)
    model = load_model(_cfg(params, pretrained=str(path)))
    assert isinstance(model, OriginalModel) and model.source_path == str(path)
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    modules = (model.unet, model.first_stage, model.cond_stage)  # built on meta, then given the tensors
    assert {p.device.type for m in modules for p in m.parameters()} == {"cpu"}
    assert model.scale_factor == 1.0 and model.first_stage.config.scaling_factor == 1.0
    assert model.vae is model.first_stage and model.class_embedder is model.cond_stage and model.text_encoder is None
    assert model.scaling_factor == 1.0 and (model.class_embedder.n_classes, model.class_embedder.null_class) == (10, 10)
    with pytest.raises(UserError, match=r"class id out of range: got 3\.\.11, the model knows 0\.\.9 and the null"):
        model.class_embedder(torch.tensor([3, 11]))
    _check_outputs(model, unet_io, vq_io)


def test_safetensors_found_in_paths_models(tmp_path):
    state, params, unet_io, vq_io = _tiny_ldm_checkpoint()
    save_file(state, str(tmp_path / "tiny.safetensors"))
    cfg = _cfg(params, models_dir=str(tmp_path))
    assert resolve(cfg) == ("checkpoint", str(tmp_path / "tiny.safetensors"))
    _check_outputs(load_model(cfg), unet_io, vq_io)


def test_a_folder_holding_model_ckpt_and_the_scale_factor_buffer(tmp_path):
    state, params, unet_io, vq_io = _tiny_ldm_checkpoint()
    torch.save({"state_dict": {**state, "scale_factor": torch.tensor(0.5)}}, tmp_path / "model.ckpt")
    model = load_model(_cfg(params, pretrained=str(tmp_path)))
    assert model.scale_factor == 0.5 and model.first_stage.config.scaling_factor == 0.5
    _check_outputs(model, unet_io, vq_io)


def test_use_ema_reads_the_litema_shadow(tmp_path):
    state, params, unet_io, _ = _tiny_ldm_checkpoint()
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + k[len("model."):].replace(".", ""): state[k] for k in unet_keys}
    broken = {**state, **{k: torch.zeros_like(state[k]) for k in unet_keys}, **ema}
    torch.save({"state_dict": broken}, tmp_path / "ema.ckpt")
    cfg = _cfg(params, pretrained=str(tmp_path / "ema.ckpt"))
    cfg.original.use_ema = True
    model = load_model(cfg)
    with torch.no_grad():
        out = model.unet(unet_io["x"], unet_io["timesteps"],
                         encoder_hidden_states=model.cond_stage(unet_io["class_label"])).sample
    close(out, unet_io["out"])


def test_ddim_training_checkpoint_list_uses_the_ema_entry(tmp_path):
    state, io, meta = tiny("ddim_cifar_A")
    params = original_config(meta)
    params["diffusion"].update(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    zeros = {"module." + k: torch.zeros_like(v) for k, v in state.items()}
    torch.save([zeros, {}, 3, 1000, state], tmp_path / "ckpt.pth")
    assert read_checkpoint(tmp_path / "ckpt.pth").keys() == state.keys()
    cfg = _cfg(params, pretrained=str(tmp_path / "ckpt.pth"), unet_class="UNet2DModel", image_size=32)
    cfg.original.kind = "ddim"
    model = load_model(cfg)
    assert model.first_stage is None and model.scheduler_config["beta_schedule"] == "linear"
    with torch.no_grad():
        close(model.unet(io["x"], io["timesteps"]).sample, io["out"])


def test_a_diffusers_folder_is_loaded_with_from_pretrained(tmp_path):
    state, params, unet_io, vq_io = _tiny_ldm_checkpoint()
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    converted = load_model(_cfg(params, pretrained=str(tmp_path / "model.ckpt")))
    folder = tmp_path / "diffusers"
    converted.unet.save_pretrained(folder / "unet")
    converted.first_stage.save_pretrained(folder / "vqvae")
    cfg = _cfg(params, pretrained=str(folder))
    cfg.original.diffusers_parts = {"unet": "unet", "first_stage": "vqvae"}
    model = load_model(cfg)
    assert model.cond_stage is None  # diffusers has no class embedder: conditioning comes from elsewhere
    with torch.no_grad():
        out = model.unet(unet_io["x"], unet_io["timesteps"], encoder_hidden_states=unet_io["context"]).sample
        dec = model.first_stage.decode(vq_io["z"]).sample
    close(out, unet_io["out"])
    close(dec, vq_io["dec"])


def test_missing_file_names_the_file_what_it_is_and_where_it_is_published(tmp_path):
    _, params, _, _ = _tiny_ldm_checkpoint()
    with pytest.raises(UserError, match=r"needs ldm/tiny/model\.ckpt \(the tiny test model, published at nowhere "
                                        r"\(made by the test\)\); not in paths\.models=.* Fix: set model\.pretrained"):
        load_model(_cfg(params, models_dir=str(tmp_path)))
    with pytest.raises(UserError, match=r"model\.pretrained=/no/such/model\.ckpt: no such file or folder; model "
                                        r"'tiny_cin' expects ldm/tiny/model\.ckpt \(the tiny test model"):
        load_model(_cfg(params, pretrained="/no/such/model.ckpt"))


def test_a_checkpoint_for_another_model_is_a_one_line_error(tmp_path):
    state, params, _, _ = _tiny_ldm_checkpoint()
    other, _, _ = tiny("ldm_unet_A")
    torch.save({"state_dict": {**state, **other}}, tmp_path / "model.ckpt")
    with pytest.raises(UserError, match=r"LDM UNet: the checkpoint does not match its config: .*Fix: use the"):
        load_model(_cfg(params, pretrained=str(tmp_path / "model.ckpt")))


def test_a_damaged_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read checkpoint .*model\.ckpt: .*Fix: check the file is complete"):
        read_checkpoint(path)


def test_ldm_schedule_is_linear_in_sqrt_beta():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**scheduler_from_params("ldm", {"linear_start": 0.0015, "linear_end": 0.0195}))
    expected = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(sched.betas.double(), expected, atol=1e-9, rtol=1e-6)



def _pickle_with_fake_module(tmp_path, module_name: str, obj_fn):
    """Save a checkpoint that names a class of ``module_name`` (a module that exists only while saving)."""
    import sys
    import types

    parts = module_name.split(".")
    made = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            made.append(name)
    cls = type("ModelCheckpoint", (), {"__module__": module_name})
    sys.modules[module_name].ModelCheckpoint = cls
    try:
        path = tmp_path / "model.ckpt"
        torch.save(obj_fn(cls), path)
    finally:
        for name in made:
            del sys.modules[name]
    return path


def test_lightning_bookkeeping_classes_are_read_as_inert_stubs(tmp_path):
    """Old Lightning keys callback states by the callback class: safe loading must still read the weights."""
    state, params, unet_io, vq_io = _tiny_ldm_checkpoint()
    path = _pickle_with_fake_module(tmp_path, "pytorch_lightning.callbacks.model_checkpoint", lambda cls: {
        "state_dict": state, "callbacks": {cls: {"best_model_score": torch.tensor(0.5)}}, "cls": cls()})
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # what plain safe loading says
    _check_outputs(load_model(_cfg(params, pretrained=str(path))), unet_io, vq_io)


def test_other_pickled_objects_are_still_refused(tmp_path):
    state, params, _, _ = _tiny_ldm_checkpoint()
    path = _pickle_with_fake_module(tmp_path, "evil_pkg.payload", lambda cls: {"state_dict": state, "x": cls()})
    with pytest.raises(UserError, match=r"pickles objects other than tensors \(evil_pkg\.payload\.ModelCheckpoint\)"):
        read_checkpoint(path)


def test_an_sd_like_diffusers_folder_brings_vae_scale_and_text_encoder(tmp_path):
    from tfmq_exp.models.convert import clip_text, first_stage

    state, params, unet_io, _ = _tiny_ldm_checkpoint()
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    unet = load_model(_cfg(params, pretrained=str(tmp_path / "model.ckpt"))).unet
    _, _, kl_meta = tiny("kl_f8_A")
    kl_params = original_config(kl_meta)
    vae = first_stage.build(kl_params, "kl", scale_factor=0.18215)
    folder = tmp_path / "sd"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text = clip_text.build({"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                            "num_attention_heads": 4, "max_position_embeddings": 8})
    text.save_pretrained(folder / "text_encoder")
    sd_params = {**params, "scale_factor": 0.18215,
                 "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": kl_params},
                 "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}
    cfg = _cfg(sd_params, pretrained=str(folder))
    cfg.original.diffusers_parts = {"unet": "unet", "first_stage": "vae", "cond_stage": "text_encoder"}
    model = load_model(cfg)
    assert type(model.vae).__name__ == "AutoencoderKL" and model.scaling_factor == 0.18215
    assert type(model.text_encoder).__name__ == "CLIPTextModel" and model.class_embedder is None
    with torch.no_grad():
        context = model.text_encoder(torch.tensor([[0, 5, 7, 2]])).last_hidden_state.expand(2, -1, -1)
        out = model.unet(unet_io["x"], unet_io["timesteps"], encoder_hidden_states=context).sample
    assert out.shape == unet_io["out"].shape and torch.isfinite(out).all()

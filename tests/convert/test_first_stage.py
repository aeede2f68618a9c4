"""VQ-f4 and KL-f8 first stages -> VQModel / AutoencoderKL, against the original outputs."""

from __future__ import annotations

import torch
from original_fixtures import close, original_config, tiny

from tfmq_exp.models.convert import first_stage
from tfmq_exp.models.convert.keymap import load_converted, strip_prefix

PREFIX = "first_stage_model."


def _model(family: str, kind: str):
    state, io, meta = tiny(family)
    params = original_config(meta)
    converted = first_stage.convert(strip_prefix(state, PREFIX), params, kind)
    model = load_converted(first_stage.build(params, kind), converted)
    return model.eval(), io


def test_vq_encode_quantize_decode_reproduce_original():
    vq, io = _model("vq_f4_A", "vq")
    with torch.no_grad():
        h = vq.encode(io["x"]).latents
        quant, _, (_, _, idx) = vq.quantize(h)
        z_quant, _, (_, _, z_idx) = vq.quantize(io["z"])
        dec = vq.decode(io["z"]).sample
        dec_raw = vq.decode(io["z"], force_not_quantize=True).sample
    close(h, io["h"])  # encode = encoder -> quant_conv, before the codebook
    close(quant, io["encode_quant"])
    assert torch.equal(idx.reshape(2, -1), io["encode_indices"])
    close(z_quant, io["z_quant"])
    assert torch.equal(z_idx.reshape(2, -1), io["z_indices"])
    close(dec, io["dec"])  # decode quantizes first: LDM's decode_first_stage path
    close(dec_raw, io["dec_force_not_quantize"])
    assert (dec - dec_raw).abs().max() > 1e-2  # the two paths really differ on this z


def test_kl_posterior_and_decode_reproduce_original():
    kl, io = _model("kl_f8_A", "kl")
    with torch.no_grad():
        post = kl.encode(io["x"]).latent_dist
        dec = kl.decode(io["z"]).sample
        dec_mode = kl.decode(post.mode()).sample
    close(post.parameters, io["moments"])
    close(post.mean, io["posterior_mean"])
    close(post.logvar, io["posterior_logvar"])
    close(post.std, io["posterior_std"])
    close(dec, io["dec"])
    close(dec_mode, io["dec_of_mode"])


def test_kl_logvar_is_clamped_as_the_original():
    kl, io = _model("kl_f8_A", "kl")
    with torch.no_grad():
        kl.quant_conv.bias[4:] += 100.0  # push the log-variance half far above 20
        post = kl.encode(io["x"]).latent_dist
    assert post.logvar.max().item() == 20.0


def test_training_loss_keys_of_standalone_checkpoints_are_ignored():
    state, _, meta = tiny("vq_f4_A")
    params = original_config(meta)
    plain = strip_prefix(state, PREFIX)
    plain["loss.discriminator.main.0.weight"] = torch.zeros(3)
    assert first_stage.convert(plain, params, "vq").keys() == first_stage.convert(
        strip_prefix(state, PREFIX), params, "vq").keys()

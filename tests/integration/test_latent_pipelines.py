"""The whole app on tiny random-weight latent models, one per family, for tfmq, qdiff and brecq.

* text-conditional: a Stable-Diffusion-style diffusers folder (UNet2DConditionModel, AutoencoderKL, a tiny
  CLIPTextModel and a CLIP tokenizer made from a small vocabulary written here), loaded as ``model=sd14``;
* class-conditional: ``model=mnist_ldm`` shrunk and given random weights (class context through
  cross-attention, AutoencoderKL first stage);
* unconditional VQ: an LDM-CelebA-style diffusers folder (UNet2DModel, VQModel), loaded as ``model=ldm_celebahq``.

Each quantizes with debug=smoke, writes its checkpoint, and ``task=sample ckpt=...`` reproduces the samples
bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel

from tfmq_exp.app import run

torch.set_num_threads(1)
SMOKE = ("debug=smoke", "evaluator=none", "sampler.steps=5", "n_compare=4", "n_grid=4",
         "calib.n_trajectories=8", "calib.per_step=8", "recon.pool_size=32", "++quantizer.options.calib_steps=5")
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car"]


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer over a few whole words and every letter (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *[f"{c}</w>" for c in letters]]
    merges = []
    for w in WORDS:  # merge each word left to right: p h -> ph, ph o -> pho, ... , phot o</w> -> photo</w>
        parts = [*w[:-1], w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            tokens.append(parts[0])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    tok.save_pretrained(str(folder))


def sd_folder(root: Path) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    write_tokenizer(root / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    enc = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    enc.save_pretrained(str(root / "text_encoder"))
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).save_pretrained(str(root / "unet"))
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    ).save_pretrained(str(root / "vae"))
    return root


def vq_folder(root: Path) -> Path:
    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    ).save_pretrained(str(root / "unet"))
    VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=3,
        num_vq_embeddings=16, vq_embed_dim=3, norm_num_groups=4, sample_size=16,
    ).save_pretrained(str(root / "vqvae"))
    return root


TINY_MNIST_LDM = (
    "model.arch.block_out_channels=[8,16]", "model.arch.norm_num_groups=4", "model.arch.cross_attention_dim=8",
    "model.arch.attention_head_dim=2", "model.class_embedder.embed_dim=8",
    "model.first_stage.arch.block_out_channels=[8,8,8]", "model.first_stage.arch.norm_num_groups=4",
)


def mnist_ldm_weights(make_cfg, path: Path) -> Path:
    from tfmq_exp.models.mnist_ldm import build_parts, save_mnist_ldm

    torch.manual_seed(0)
    cfg = make_cfg("model=mnist_ldm", *TINY_MNIST_LDM)
    save_mnist_ldm(path, build_parts(cfg.model), 0.5, {"made_by": "test"})
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    prompts = root / "captions.json"
    prompts.write_text(json.dumps({"annotations": [{"caption": c} for c in
                                                   ["a photo of a cat", "a red car", "a blue dog", "a dog"]]}))
    return {"sd": sd_folder(root / "sd"), "vq": vq_folder(root / "vq"), "prompts": prompts}


def model_overrides(kind: str, folders: dict[str, Path], make_cfg, tmp_path: Path) -> list[str]:
    if kind == "text":
        return ["model=sd14", f"model.pretrained={folders['sd']}", "model.image_size=8",
                f"dataset.prompts={folders['prompts']}", "recon.batch_size=8"]
    if kind == "class":
        return ["model=mnist_ldm", *TINY_MNIST_LDM, f"model.weights={mnist_ldm_weights(make_cfg, tmp_path / 'w.st')}"]
    return ["model=ldm_celebahq", f"model.pretrained={folders['vq']}", "model.image_size=8"]


@pytest.mark.parametrize("method", ["tfmq", "qdiff", "brecq"])
@pytest.mark.parametrize("kind", ["text", "class", "vq"])
def test_latent_model_quantizes_and_its_checkpoint_reloads_bit_for_bit(make_cfg, tmp_path, folders, kind, method):
    base = model_overrides(kind, folders, make_cfg, tmp_path)
    run(make_cfg(*SMOKE, *base, f"quantizer={method}", "bits=w4a8"))
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["complete"] is True and res["quantizer"] == method
    images = np.load(tmp_path / "samples.npz")["arr_0"].copy()
    if kind == "class":
        assert images.shape[1:] == (28, 28, 1)  # decoded by the first stage, in full precision
    else:
        assert images.shape[1:] == (16, 16, 3)
    if kind == "text":  # the prompts used (a seeded choice from the captions file) are saved with the run
        assert sorted(res["conditioning"]["prompts"]) == ["a blue dog", "a dog", "a photo of a cat", "a red car"]
    if kind == "class":
        assert res["conditioning"]["labels"][:4] == [0, 1, 2, 3]
    ckpt = tmp_path / "q.safetensors"
    (tmp_path / "quantized.safetensors").rename(ckpt)
    run(make_cfg(*SMOKE, *base, "task=sample", f"ckpt={ckpt}"))
    assert np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], images)


def test_a_missing_tokenizer_is_one_clear_line(tmp_path):
    from tfmq_exp.errors import UserError
    from tfmq_exp.models.original import OriginalModel

    model = OriginalModel(torch.nn.Identity(), {}, "sd14", 8, 4, cond_stage=torch.nn.Identity(),
                          tokenizer_sources=[(str(tmp_path / "sd"), "tokenizer"), (str(tmp_path / "clip"), None)])
    with pytest.raises(UserError, match=r"cannot load the CLIP tokenizer of model 'sd14' \(tried: .*sd/tokenizer, "
                                        r".*clip\)\. Fix: set model.original.tokenizer=PATH"):
        _ = model.tokenizer


@pytest.mark.parametrize("kind", ["class", "text"])
def test_conditional_latent_model_exports_and_samples_through_the_runtime(make_cfg, tmp_path, folders, kind):
    """task=export of a conditional latent model takes the context as a model input (class embeddings or
    text encoder states, with guidance doubling the batch), and backend=openvino samples what the
    fake-quant model samples from the same noise and contexts (TFMQ: per-step tables, sampled step-major)."""
    base = model_overrides(kind, folders, make_cfg, tmp_path)
    run(make_cfg(*SMOKE, *base, "quantizer=tfmq", "bits=w8a8"))
    ckpt = tmp_path / "q.safetensors"
    (tmp_path / "quantized.safetensors").rename(ckpt)
    exp_dir = tmp_path / "export"
    exp_dir.mkdir()
    cfg = make_cfg(*SMOKE, *base, "task=export", f"ckpt={ckpt}", "export.threads=1")
    cfg.paths.output_dir = str(exp_dir)
    res = run(cfg)
    assert res["step_tables"] == "per_step" and res["quantized_layers_not_int8"] == []
    assert json.loads((exp_dir / "export.json").read_text())["conditional"] is True
    assert all(d["rel_l2"] < 0.05 for d in res["unet_vs_fake_quant"].values())
    images = {}
    for backend in ("torch", "openvino"):
        run(make_cfg(*SMOKE, *base, "task=sample", f"ckpt={ckpt}", f"backend={backend}", f"export.dir={exp_dir}",
                     "export.threads=1"))
        images[backend] = np.load(tmp_path / "samples.npz")["arr_0"].astype(np.float64)
    mse = ((images["torch"] - images["openvino"]) ** 2).mean()
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 30

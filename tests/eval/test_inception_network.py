import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from tfmq_exp.eval.inception_metrics import IS_UNAVAILABLE, inception_metrics, inception_score
from tfmq_exp.eval.inception_network import SFID_DIM, SFID_LAYER, InceptionExtractor
from tfmq_exp.eval.inception_weights import resolve_inception_weights
from tfmq_exp.eval.reference_stats import ReferenceStats


def _manual_mixed_6d_branch1x1(net, x_uint8):
    """Forward by hand through torch-fidelity's modules up to Mixed_6d.branch1x1 (conv, BN, ReLU)."""
    x = interpolate_bilinear_2d_like_tensorflow1x(x_uint8.float(), size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    for name in [
        "Conv2d_1a_3x3",
        "Conv2d_2a_3x3",
        "Conv2d_2b_3x3",
        "MaxPool_1",
        "Conv2d_3b_1x1",
        "Conv2d_4a_3x3",
        "MaxPool_2",
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
        "Mixed_6a",
        "Mixed_6b",
        "Mixed_6c",
    ]:
        x = getattr(net, name)(x)
    unit = net.Mixed_6d.branch1x1
    return F.relu(unit.bn(unit.conv(x)))


def test_sfid_features_come_from_mixed_6d_branch1x1(extractor, make_images):
    assert SFID_LAYER == "Mixed_6d.branch1x1"
    images = make_images(2, size=28, seed=3)
    feats = extractor.extract(images)
    assert feats.spatial.shape == (2, SFID_DIM) == (2, 2023)
    with torch.no_grad():
        expected = _manual_mixed_6d_branch1x1(extractor.net, images)
    assert expected.shape == (2, 192, 17, 17)
    nhwc = expected[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()  # TF's mixed_6/conv[..., :7] order
    np.testing.assert_allclose(feats.spatial, nhwc, atol=1e-5, rtol=0)
    assert (feats.spatial >= 0).all() and (feats.spatial > 0).mean() > 0.1  # post-ReLU, not all zero


def test_grayscale_is_repeated_to_rgb(extractor, make_images):
    gray = make_images(1, size=28, seed=4, channels=1)
    a = extractor.extract(gray).pool
    b = extractor.extract(gray.expand(-1, 3, -1, -1).contiguous()).pool
    np.testing.assert_array_equal(a, b)


def test_is_unavailable_without_logits(extractor, make_images):
    feats = extractor.extract(make_images(2, seed=5))
    assert feats.logits is None
    ref = ReferenceStats(np.zeros(2048), np.eye(2048), None, None, None, 0, "k", "d")
    out = inception_metrics(feats, ref, ["is"])
    assert out == {"is": IS_UNAVAILABLE}
    assert IS_UNAVAILABLE == "unavailable: needs the full Inception weights (evaluator.inception_weights=...)"


def test_is_with_full_weights_gives_a_number(full_weights_path, make_images):
    ex = InceptionExtractor(resolve_inception_weights(full_weights_path), batch_size=4)
    feats = ex.extract(make_images(4, seed=6))
    assert feats.logits.shape == (4, 1008)
    res = inception_score(feats.logits, splits=1)
    assert res["is"] > 1.0 and np.isfinite(res["is"])


def test_inception_score_formula_by_hand():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 1.0, 1.0]], np.float32)
    z = logits.astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    marginal = p.mean(0)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    assert inception_score(logits, splits=1)["is"] == pytest.approx(expected, rel=1e-9)
    two = inception_score(logits, splits=2, rng_seed=0)
    assert two["is_std"] >= 0.0

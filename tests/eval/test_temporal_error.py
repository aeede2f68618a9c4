import json

import pytest
import torch

from tfmq_exp.eval.temporal_error import plot_temporal_error, temporal_feature_error


def _fp_steps(n_steps=5, batch=3, dim=8):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, dim, generator=gen) * (t + 1) for t in range(n_steps)]


def test_identical_features():
    fp = _fp_steps()
    rep = temporal_feature_error(fp, [f.clone() for f in fp])
    assert rep["cosine"] == pytest.approx([1.0] * 5)
    assert rep["rel_l2"] == pytest.approx([0.0] * 5, abs=1e-12)
    assert rep["nearest_fp_index"] == [0, 1, 2, 3, 4]
    assert rep["fraction_shifted"] == 0.0


def test_shifted_features_point_at_the_next_fp_step():
    fp = _fp_steps()
    quant = fp[1:] + [fp[-1]]  # quantized step t looks like FP step t + 1
    rep = temporal_feature_error(fp, quant)
    assert rep["nearest_fp_index"] == [1, 2, 3, 4, 4]
    assert rep["fraction_shifted"] == pytest.approx(0.8)
    assert rep["nearest_fp_rel_l2"][0] == pytest.approx(0.0, abs=1e-12)
    f, q = fp[0].double(), quant[0].double()
    assert rep["rel_l2"][0] == pytest.approx(float((q - f).norm() / f.norm()))
    cos = torch.nn.functional.cosine_similarity(q, f, dim=1).mean()
    assert rep["cosine"][0] == pytest.approx(float(cos))


def test_hand_values_and_dict_input():
    fp = {"t=999": torch.tensor([[1.0, 0.0]]), "t=500": torch.tensor([[0.0, 2.0]])}
    quant = {"t=999": torch.tensor([[1.0, 1.0]]), "t=500": torch.tensor([[0.0, 2.0]])}
    rep = temporal_feature_error(fp, quant)
    assert rep["steps"] == ["t=999", "t=500"]
    assert rep["cosine"][0] == pytest.approx(2**-0.5)
    assert rep["rel_l2"] == pytest.approx([1.0, 0.0])
    assert rep["nearest_fp_step"] == ["t=999", "t=500"]  # |(1,1)-(1,0)| = 1 < |(1,1)-(0,2)| = sqrt 2
    json.dumps(rep)


def test_plot_writes_png(tmp_path):
    fp = _fp_steps()
    path = plot_temporal_error(
        temporal_feature_error(fp, [f * 1.1 for f in fp]), tmp_path / "fig" / "temporal.png"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_mismatched_steps_raise():
    with pytest.raises(ValueError):
        temporal_feature_error(_fp_steps(5), _fp_steps(4))

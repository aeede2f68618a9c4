"""Item 8 (the parts in this project's eval code): the temporal-error plot scales to its data, and the
one-off reference statistics say they are computed once and cached."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tfmq_exp.eval.reference_stats import reference_stats
from tfmq_exp.eval.temporal_error import (
    data_limits,
    plot_temporal_error,
    temporal_error_figure,
    temporal_feature_error,
)


def test_axis_limits_follow_the_data():
    lo, hi = data_limits([0.9993, 0.9999, 0.9996])
    assert lo == pytest.approx(0.9993 - 0.00006) and hi == pytest.approx(0.9999 + 0.00006)
    assert data_limits([0.02, float("nan"), 0.04]) == pytest.approx((0.018, 0.042))
    lo, hi = data_limits([1.0, 1.0])
    assert lo < 1.0 < hi and hi - lo < 0.01  # a flat series gets a narrow band, not [0, 2]


def test_plot_puts_cosine_and_error_on_their_own_scaled_axes(tmp_path):
    torch.manual_seed(0)
    fp = [torch.randn(4, 16) for _ in range(5)]
    q = [f + 0.01 * torch.randn_like(f) for f in fp]
    report = temporal_feature_error(fp, q)
    fig = temporal_error_figure(report)
    cosine_ax, _, error_ax = fig.axes
    c_lo, c_hi = cosine_ax.get_ylim()
    e_lo, e_hi = error_ax.get_ylim()
    assert c_lo <= min(report["cosine"]) and max(report["cosine"]) <= c_hi and c_hi - c_lo < 0.01
    assert e_lo <= min(report["rel_l2"]) and max(report["rel_l2"]) <= e_hi and e_hi - e_lo < 0.02
    assert plot_temporal_error(report, tmp_path / "t.png").stat().st_size > 0


class _Extractor:
    fingerprint = "fake-extractor"
    batch_size = 4

    def extract(self, batches, total=None, desc=""):
        self.desc = desc
        from tfmq_exp.eval.inception_network import InceptionFeatures

        n = sum(b.shape[0] for b in batches)
        rng = np.random.default_rng(0)
        return InceptionFeatures(pool=rng.normal(size=(n, 8)), spatial=rng.normal(size=(n, 8)), logits=None)


def test_reference_statistics_say_once_and_cached(tmp_path, caplog):
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    ext = _Extractor()
    with caplog.at_level(logging.INFO, logger="tfmq_exp"):
        reference_stats(images, ext, tmp_path, need_pool=False)
    assert "(6 images): computed once, cached in" in caplog.text and "for later runs" in caplog.text
    assert ext.desc == "reference features (once, then cached)"


def test_bars_only_in_a_terminal(monkeypatch, capsys):
    import io

    from tfmq_exp.progress import progress_bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TFMQ_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a Slurm log: no bar
    assert progress_bar(range(3), desc="units").disable is True
    monkeypatch.setattr("sys.stderr", Tty())
    assert progress_bar(range(3), desc="units").disable is False
    assert progress_bar(range(3), desc="units", disable=True).disable is True  # the caller's choice holds
    monkeypatch.setenv("TFMQ_PROGRESS", "0")
    assert progress_bar(range(3)).disable is True
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setenv("TFMQ_PROGRESS", "1")
    assert progress_bar(range(3)).disable is False

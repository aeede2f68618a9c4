"""Temporal-feature error per sampling step (TFMQ-DM Figures 2 and 4).

Given the FP model's and the quantized model's temporal features (the time-embedding outputs) at
each step, we report per step the cosine similarity and relative L2 error, and which FP step the
quantized feature most resembles (argmin of L2 over all FP steps): a quantized model whose step-t
feature sits nearest FP step t' != t has its time information shifted ("temporal feature disturbance").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

Features = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


def temporal_feature_error(fp: Features, quant: Features) -> dict:
    """Per-step errors as plain lists (JSON-serialisable).

    ``fp``/``quant``: a list over steps of tensors [B, ...] or a dict step-name -> tensor, in
    sampling order; both must have the same steps and shapes. Returns ``steps`` (names),
    ``cosine`` (mean over the batch of per-sample cosine similarity), ``rel_l2``
    (||q - f|| / ||f|| over the whole batch), ``nearest_fp_index``/``nearest_fp_step`` (FP step of
    smallest L2 to the quantized feature) and ``nearest_fp_rel_l2``, plus their means.
    """
    names, f = _stack(fp)
    q_names, q = _stack(quant)
    if q_names != names or q.shape != f.shape:
        raise ValueError(
            f"FP and quantized features differ: steps {len(names)} vs {len(q_names)}, "
            f"shapes {tuple(f.shape)} vs {tuple(q.shape)}"
        )
    steps, batch = f.shape[:2]
    f_flat, q_flat = f.reshape(steps, batch, -1), q.reshape(steps, batch, -1)
    cosine = torch.nn.functional.cosine_similarity(q_flat, f_flat, dim=-1, eps=1e-12).mean(dim=1)
    f_norm = f_flat.flatten(1).norm(dim=1).clamp_min(1e-12)
    rel_l2 = (q_flat - f_flat).flatten(1).norm(dim=1) / f_norm
    distances = torch.cdist(q_flat.flatten(1)[None], f_flat.flatten(1)[None])[0]  # [quant step, fp step]
    nearest = distances.argmin(dim=1)
    nearest_rel = distances.gather(1, nearest[:, None])[:, 0] / f_norm
    return {
        "steps": names,
        "cosine": cosine.tolist(),
        "rel_l2": rel_l2.tolist(),
        "nearest_fp_index": nearest.tolist(),
        "nearest_fp_step": [names[i] for i in nearest.tolist()],
        "nearest_fp_rel_l2": nearest_rel.tolist(),
        "mean_cosine": float(cosine.mean()),
        "mean_rel_l2": float(rel_l2.mean()),
        "fraction_shifted": float((nearest != torch.arange(steps)).double().mean()),
    }


def plot_temporal_error(report: dict, path: str | Path, title: str = "temporal feature error") -> Path:
    """Write a two-panel PNG: cosine / relative L2 per step, and nearest FP step per quantized step."""
    fig = temporal_error_figure(report, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def temporal_error_figure(report: dict, title: str = "temporal feature error"):
    """The figure of plot_temporal_error; axes: [cosine, nearest step, relative L2 (twin of cosine)]."""
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend change

    x = np.arange(len(report["steps"]))
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    # cosine sits near 1 and the relative error near 0: one axis each, each scaled to its own data
    line1 = ax1.plot(x, report["cosine"], color="tab:blue", label="cosine similarity")
    ax1.set_ylim(*data_limits(report["cosine"]))
    ax1.set_ylabel("cosine similarity")
    ax1r = ax1.twinx()
    line2 = ax1r.plot(x, report["rel_l2"], color="tab:orange", label="relative L2 error")
    ax1r.set_ylim(*data_limits(report["rel_l2"]))
    ax1r.set_ylabel("relative L2 error")
    ax1.set_xlabel("sampling step (index)")
    ax1.legend(line1 + line2, [ln.get_label() for ln in line1 + line2], loc="best")
    ax1.set_title(title)
    ax2.plot(x, x, "k--", linewidth=0.8, label="same step")
    ax2.scatter(x, report["nearest_fp_index"], s=10, label="nearest FP step")
    ax2.set_xlabel("quantized step (index)")
    ax2.set_ylabel("FP step (index)")
    ax2.legend()
    fig.tight_layout()
    return fig


def data_limits(values: Sequence[float], margin: float = 0.1) -> tuple[float, float]:
    """Axis limits around the finite data with a margin; a flat series gets a small band around its value."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else max(abs(hi) * 1e-3, 1e-9)
    return lo - margin * span, hi + margin * span


def _stack(features: Features) -> tuple[list[str], torch.Tensor]:
    if isinstance(features, Mapping):
        names, tensors = [str(k) for k in features], list(features.values())
    else:
        tensors = list(features)
        names = [str(i) for i in range(len(tensors))]
    if not tensors:
        raise ValueError("no temporal features given")
    stacked = torch.stack([torch.as_tensor(t).detach().cpu().double() for t in tensors])
    if stacked.dim() == 2:  # one vector per step: a batch of one
        stacked = stacked[:, None]
    return names, stacked

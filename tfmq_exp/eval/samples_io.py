"""Write samples to disk: a PNG folder, and the ADM evaluator's .npz (uint8 NHWC ``arr_0``).

The ADM format lets guided-diffusion's reference evaluator cross-check our numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tfmq_exp.eval.images import to_uint8_nchw


def to_uint8_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 NCHW / NHWC / NHW -> numpy uint8 (N, H, W, C)."""
    return to_uint8_nchw(images).permute(0, 2, 3, 1).cpu().numpy()


def save_png_folder(images: torch.Tensor | np.ndarray, folder: str | Path, prefix: str = "") -> Path:
    """One PNG per image, ``{prefix}{index:06d}.png``; grayscale stays single-channel (mode L)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_uint8_nhwc(images)):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{prefix}{i:06d}.png")
    return folder


def save_adm_npz(
    images: torch.Tensor | np.ndarray, path: str | Path, labels: np.ndarray | None = None
) -> Path:
    """``arr_0`` = uint8 NHWC images (3 channels, as ADM expects), ``arr_1`` = labels if given. Atomic."""
    nhwc = to_uint8_nhwc(images)
    if nhwc.shape[-1] == 1:
        nhwc = np.repeat(nhwc, 3, axis=-1)
    arrays = {"arr_0": nhwc}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_adm_npz(path: str | Path) -> np.ndarray:
    """The uint8 NHWC ``arr_0`` of an ADM-format file."""
    with np.load(path, allow_pickle=False) as npz:
        return npz["arr_0"]

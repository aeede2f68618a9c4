"""Image layout helpers: everything that reaches Inception is a uint8 (N, 3, H, W) tensor.

torch-fidelity resizes uint8 input to 299x299 inside its network with its TF1-compatible bilinear
resize; feeding it uint8 at native resolution keeps our numbers identical to ``calculate_metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tfmq_exp.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, C, H, W), (N, H, W, C) or (N, H, W) uint8 -> (N, C, H, W) uint8 with C in {1, 3}."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}; convert with (x.clamp(-1, 1) + 1) * 127.5")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got shape {tuple(x.shape)}")
    return x.contiguous()


def to_uint8_rgb(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """As ``to_uint8_nchw`` with grayscale repeated to 3 channels (what PIL's convert('RGB') does)."""
    x = to_uint8_nchw(images)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def tensor_batches(images: torch.Tensor | np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield uint8 RGB batches from an in-memory image array."""
    x = to_uint8_nchw(images)
    for start in range(0, x.shape[0], batch_size):
        yield to_uint8_rgb(x[start : start + batch_size])


def batch_source(
    images: torch.Tensor | np.ndarray | Iterable[torch.Tensor], batch_size: int, total: int | None
) -> tuple[Iterable[torch.Tensor], int | None]:
    """(uint8 batches, image count) from an image array, or an iterable of batches passed through."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return tensor_batches(images, batch_size), len(images)
    return images, total


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; UserError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"image folder not found: {folder}. Fix: set evaluator.reference to an existing folder."
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}. Fix: point at a folder of images."
        )
    return files


def folder_batches(files: Iterable[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """Read images as RGB uint8 (like torch-fidelity's folder input) and yield stacked batches."""
    batch: list[np.ndarray] = []
    for path in files:
        with Image.open(path) as img:
            batch.append(np.asarray(img.convert("RGB")))
        if len(batch) == batch_size:
            yield _stack(batch, path)
            batch = []
    if batch:
        yield _stack(batch, "the last batch")


def _stack(arrays: list[np.ndarray], where: object) -> torch.Tensor:
    if len({a.shape for a in arrays}) != 1:
        raise UserError(
            f"images of different sizes near {where}. Fix: resize the folder's images to one size."
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

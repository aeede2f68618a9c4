"""The committed digit classifier: accuracy on the 1,000 held-out digits, and its input checks."""

from __future__ import annotations

import numpy as np
import pytest

from tfmq_exp.errors import UserError
from tfmq_exp.eval.digit_classifier import class_accuracy, split_indices

HELD_OUT_BOUND = 0.95  # measured 0.968 (README)


def test_split_is_stratified_and_disjoint(digits):
    _, labels = digits
    tr, held = split_indices(labels)
    assert len(tr) == 4000 and len(held) == 1000 and not set(tr) & set(held)
    assert np.bincount(labels[held], minlength=10).tolist() == [100] * 10


def test_held_out_accuracy_above_bound(digits):
    images, labels = digits
    _, held = split_indices(labels)
    acc = class_accuracy(images[held][:, None], labels[held])
    assert acc > HELD_OUT_BOUND, acc
    rgb = np.repeat(images[held][:, None], 3, axis=1)  # grey replicated to 3 channels reads the same
    assert class_accuracy(rgb, labels[held]) == acc
    assert class_accuracy(images[held][:, None], (labels[held] + 1) % 10) < 0.05  # wrong labels: near zero


def test_bad_input_gets_one_clear_line():
    with pytest.raises(UserError, match=r"uint8 images of shape \(N, 1 or 3, 28, 28\)"):
        class_accuracy(np.zeros((2, 1, 32, 32), np.uint8), [0, 1])
    with pytest.raises(UserError, match="one label per image: 2 images, 3 labels"):
        class_accuracy(np.zeros((2, 1, 28, 28), np.uint8), [0, 1, 2])

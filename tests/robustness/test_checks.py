import pytest
import torch

from tfmq_exp.checks import NonFiniteError, count_non_finite, require_finite
from tfmq_exp.errors import UserError


def test_finite_tensor_passes():
    require_finite(torch.randn(4, 4), "x")
    require_finite(torch.arange(5), "ints")  # integer tensors cannot hold NaN


def test_counts_nan_and_inf_and_names_the_tensor():
    t = torch.zeros(10)
    t[1] = float("nan")
    t[2] = float("nan")
    t[3] = float("inf")
    t[4] = float("-inf")
    assert count_non_finite(t) == (2, 2)
    msg = r"^unit 'down\.0' loss is not finite: 2 NaN and 2 Inf of 10 values\. Fix: lower lr$"
    with pytest.raises(NonFiniteError, match=msg):
        require_finite(t, "unit 'down.0' loss", fix="lower lr")


def test_is_a_user_error_with_exit_code_2_and_default_fix():
    with pytest.raises(UserError, match=r"w is not finite: 1 NaN and 0 Inf of 1 values\. Fix: check") as info:
        require_finite(torch.tensor([float("nan")]), "w")
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)

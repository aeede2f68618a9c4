"""Fixtures for the robustness tests (helpers live in robust_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from robust_cli import write_weights


@pytest.fixture
def nan_weights(tmp_path) -> Path:
    def poison(state: dict[str, torch.Tensor]) -> None:
        w = state["down_blocks.1.resnets.0.conv1.weight"]
        w.view(-1)[:3] = float("nan")
        w.view(-1)[3] = float("inf")

    return write_weights(tmp_path / "nan.safetensors", poison)

"""Reference data of the original CompVis / ermongroup code (see the folder's README).

The fixtures are committed in ``tests/fixtures/original`` (tensors and key listings only; see its README);
``TFMQ_ORIGINAL_FIXTURES`` points elsewhere. A missing file fails the tests, it does not skip them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("TFMQ_ORIGINAL_FIXTURES", REPO / "tests" / "fixtures" / "original"))


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"reference fixture {path} not found: set TFMQ_ORIGINAL_FIXTURES to the fixtures folder")
    return path


def tiny(family: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(original state dict, inputs/outputs, metadata) of one tiny seeded model."""
    weights = fixture_path(f"{family}.safetensors")
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    return load_file(str(weights)), load_file(str(fixture_path(f"{family}_io.safetensors"))), meta


def original_config(meta: dict[str, str], key: str = "original_config") -> dict:
    return json.loads(meta[key])


def fullsize(name: str) -> dict:
    return json.loads(fixture_path(f"fullsize_{name}.json").read_text())


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The issue's tolerance: 1e-4 absolute and relative, float32."""
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)

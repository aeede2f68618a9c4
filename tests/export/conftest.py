"""Fixtures of the export tests (models in export_models.py)."""

from __future__ import annotations

import pytest
from export_models import quantize_rtn, tiny_unet


@pytest.fixture(scope="module")
def w8a8_tables():
    return quantize_rtn(tiny_unet(), 8, tables=True)


@pytest.fixture(scope="module")
def w8a8_scale_tables():
    return quantize_rtn(tiny_unet(), 8, tables="scale")

"""Shared fixtures: composing the real config, and an isolated cache per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tfmq_exp.config import register_configs

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """Compose conf/config.yaml with overrides, writing into tmp_path like a Hydra run folder."""
    register_configs()

    def _make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", *overrides],
            )

    return _make

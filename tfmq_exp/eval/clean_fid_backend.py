"""clean-fid as an alternative feature backend (pool features only: no sFID hook, no logits).

Mode ``legacy_tensorflow`` reproduces the TF FID (resize inside the TorchScript Inception);
``clean`` uses clean-fid's anti-aliased PIL bicubic resize. clean-fid fetches its own TorchScript
Inception (NVlabs ``inception-2015-12-05.pt``) into /tmp; offline without it, this backend fails
with a UserError and the torch_fidelity backend is the way out.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from tfmq_exp.errors import UserError
from tfmq_exp.eval.images import batch_source
from tfmq_exp.eval.inception_network import InceptionFeatures
from tfmq_exp.progress import progress_bar as tqdm

CLEAN_FID_MODES = ("legacy_tensorflow", "clean")


class CleanFidExtractor:
    """Same interface as ``InceptionExtractor``; features come from clean-fid's network and resize."""

    has_logits = False
    source = "clean-fid TorchScript Inception"

    def __init__(
        self, mode: str = "legacy_tensorflow", device: str | torch.device = "cpu", batch_size: int = 50
    ):
        if mode not in CLEAN_FID_MODES:
            raise UserError(
                f"unknown clean-fid mode '{mode}'. Fix: use evaluator.clean_fid_mode={CLEAN_FID_MODES}."
            )
        from importlib.metadata import version

        from cleanfid.features import build_feature_extractor
        from cleanfid.resize import build_resizer

        self.mode = mode
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.fingerprint = f"clean_fid-{version('clean-fid')}-{mode}"
        self.resize = build_resizer(mode)
        try:
            self.model = build_feature_extractor(mode, device=self.device, use_dataparallel=False)
        except Exception as err:
            raise UserError(
                f"clean-fid could not load its Inception ({type(err).__name__}; offline?). "
                "Fix: use evaluator.backend=torch_fidelity, or put inception-2015-12-05.pt in /tmp."
            ) from err

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float [0, 255] as clean-fid's ResizeDataset produces it."""
        if self.mode == "legacy_tensorflow":
            return batch.float()
        resized = [self.resize(img.permute(1, 2, 0).numpy()) for img in batch]
        return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float()

    @torch.no_grad()
    def extract(
        self,
        images: torch.Tensor | np.ndarray | Iterable[torch.Tensor],
        total: int | None = None,
        desc: str = "",
    ) -> InceptionFeatures:
        """Pool features (N, 2048); ``spatial`` and ``logits`` are None."""
        images, total = batch_source(images, self.batch_size, total)
        feats = []
        with tqdm(total=total, desc=desc or "clean-fid features", unit="img", leave=False) as bar:
            for batch in images:
                feats.append(np.asarray(self.model(self.prepare(batch).to(self.device)).cpu(), np.float32))
                bar.update(len(batch))
        return InceptionFeatures(pool=np.concatenate(feats), spatial=None, logits=None)

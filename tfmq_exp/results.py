"""What a run leaves in its folder: results.json and samples.png."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def config_signature(cfg: DictConfig) -> str:
    """Hash of the resolved config minus where things are written: equal configs, equal signature."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for key in ("paths", "traceback"):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def save_rows_png(rows: list[torch.Tensor], path: Path) -> None:
    """One uint8 (n, C, H, W) batch per row, e.g. FP samples above quantized samples."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # (C, rows*H, n*W)
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if min(img.size) < 128:  # small digits: upscale so a person can see them
        k = max(1, 256 // img.size[1])
        img = img.resize((img.size[0] * k, img.size[1] * k), Image.NEAREST)
    img.save(path)



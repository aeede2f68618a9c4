"""What a run leaves in its folder: results.json, samples.png/.npz, and the INCOMPLETE marker until it ends."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf


def config_signature(cfg: DictConfig) -> str:
    """Hash of the resolved config minus where things are written and how the run is watched or resumed:
    equal configs, equal signature."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for key in ("paths", "traceback", "resume", "logger"):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


INCOMPLETE = "INCOMPLETE"


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez under a temporary name, then renamed: an interrupt never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    tmp.replace(path)


def mark_incomplete(out: Path, task: str) -> None:
    """Flag the run folder as unfinished until mark_complete (results.json then says ``"complete": true``)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / INCOMPLETE).write_text(f"task={task} started {stamp} and has not finished: do not use these results.\n")


def mark_complete(out: Path) -> None:
    (out / INCOMPLETE).unlink(missing_ok=True)


def note_failure(out: Path, message: str) -> None:
    """After a failure or interrupt: drop half-written temporaries and record why in the INCOMPLETE marker."""
    try:
        for tmp in out.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        marker = out / INCOMPLETE
        if marker.is_file():
            with open(marker, "a") as fh:
                fh.write(f"stopped: {message}\n")
    except OSError:
        pass  # the folder itself may be what failed


def save_rows_png(rows: list[torch.Tensor], path: Path) -> None:
    """One uint8 (n, C, H, W) batch per row, e.g. FP samples above quantized samples."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # (C, rows*H, n*W)
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if min(img.size) < 128:  # small digits: upscale so a person can see them
        k = max(1, 256 // img.size[1])
        img = img.resize((img.size[0] * k, img.size[1] * k), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)



"""Progress bars that show in a terminal and stay out of batch logs.

Every long loop goes through ``progress_bar`` (tqdm's arguments). Without a terminal on stderr (a Slurm
job, ``nohup``, a pipe) the bars are off and the log keeps its one line per unit, step or stage;
``TFMQ_PROGRESS=1`` forces them on, ``TFMQ_PROGRESS=0`` off.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def interactive() -> bool:
    forced = os.environ.get("TFMQ_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    if not interactive():
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)

"""Safe on-disk caches shared by the jobs of a sweep (calibration records, reference statistics,
converted Inception weights).

Three rules, used at every cache site:

* **Atomic writes** (:func:`atomic_path` and the ``write_*``/``save_*`` helpers): the entry is written
  to a uniquely named temporary file in the same folder (``.<name>.<pid>.<random>.tmp``), flushed to
  disk (fsync) and renamed onto the final name with ``os.replace``. A reader sees the old entry, the
  new one or none, never a partial file; a job killed mid-write leaves only its temporary file.
* **Damage is a miss** (:func:`read_or_miss`): an entry that cannot be read (truncated, corrupt, of
  another key) is logged and recomputed, then overwritten; it never stops a run.
* **One job computes, the others wait** (:func:`locked`): an exclusive ``fcntl.flock`` on
  ``<entry>.lock`` is held while an entry is computed and written; a job that wanted the same entry
  waits, then reads it instead of computing it again. The kernel drops the lock when its holder exits,
  even on SIGKILL, so a crashed job never blocks the next; the next job to take the lock deletes the
  temporary file the crashed one left. Where the filesystem refuses locks (some network filesystems)
  the jobs go on unlocked, with a warning: each computes the entry (the same one, up to GPU
  nondeterminism) and the last atomic replace wins; the file is whole either way, only work is
  repeated. Lock files are empty and are kept (deleting one while another job waits on it would let
  two jobs compute at once).

Linux/POSIX only for the locking (the clusters this runs on); elsewhere locking is a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # not POSIX: no locking, atomic replaces still keep entries whole
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "TMP_SUFFIX",
    "atomic_path",
    "lock_path",
    "locked",
    "read_or_miss",
    "remove_stale_temps",
    "save_npz",
    "save_safetensors",
    "write_bytes",
    "write_json",
]

log = logging.getLogger("tfmq_exp.cache")
T = TypeVar("T")
TMP_SUFFIX = ".tmp"
LOCK_SUFFIX = ".lock"
_NO_LOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


def temp_name(path: Path) -> Path:
    """A temporary file next to ``path``, unique per process and call (pid plus a random suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort (some filesystems refuse to open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it is fsynced and renamed
    onto ``path``, on any error (or interrupt) it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez`` of ``arrays``, atomically (to an open file, so numpy adds no ``.npz`` to the name)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return Path(path)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


@contextlib.contextmanager
def locked(path: str | os.PathLike, what: str = "cache entry") -> Iterator[bool]:
    """Hold the exclusive lock of cache entry ``path`` (on ``<path>.lock``) for the block.

    Yields True when locked, False when the filesystem does not support locks (then the block runs
    unlocked; see the module docstring). Not re-entrant: do not nest two ``locked`` of one path.
    """
    path = Path(path)
    if fcntl is None:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(path)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        held = _acquire(fd, path, lock, what)
        if held:
            remove_stale_temps(path)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, lock: Path, what: str) -> bool:
    """Take the exclusive lock on ``fd``, waiting (with a log line) if another job holds it; False when
    the filesystem does not support locks."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s %s: another job is computing it; waiting for it (lock %s)", what, path.name, lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except OSError as err:
        if err.errno not in _NO_LOCK_ERRNOS:
            raise
        log.warning("%s %s: the filesystem refuses locks (%s); going on unlocked (a concurrent job may "
                    "compute the same entry; the last complete write wins)", what, path.name, err)
        return False


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files of entry ``path`` left by writers that died mid-write. Call only while
    holding the entry's lock: writers hold it too, so no live writer owns such a file then."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
            log.info("removed %s, left by a job that stopped while writing %s", tmp.name, path.name)
    return removed


def read_or_miss(path: str | os.PathLike, reader: Callable[[Path], T], what: str = "cache entry") -> T | None:
    """``reader(path)``, or None when there is no entry or it is damaged (a log line says so, and the
    caller recomputes and overwrites it). ``reader`` raises on anything it does not trust."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return reader(path)
    except Exception as err:  # any failure to read means: do not trust it, rebuild it
        log.warning("%s %s is unreadable or damaged (%s: %s): recomputing it", what, path,
                    type(err).__name__, err)
        return None

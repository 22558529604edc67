"""Child processes that do not outlive the process that started them (Linux's parent-death signal)."""
from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess


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


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout (a child already gone: nothing)."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn(command: list[str], log) -> subprocess.Popen:
    """A child (with parent_death_command) whose stdout and stderr go to the open file log."""
    command, preexec = parent_death_command(command)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=preexec)

"""The front end's CPU priority: by default it yields the cores to the engines.

Why: an engine computing on the CPU splits each op of its step over every core (OpenMP, static
shares), so another thread that takes a core stalls the whole step for as long as it runs. On a
2-core host the front end's per-token work (a gRPC write and its wake-ups per streamed response)
landed almost one for one on the engine's decode step. The front end's work is elastic (a
request's tokens merge into one response while its previous one waits), the engine's is not.
So the front end's threads run at Linux's SCHED_IDLE: they get a core when no normal thread
wants it, which on such a host is every OpenMP barrier and every gap between steps.

Processes the front end starts (engines; the private etcd starts before the drop) must not
inherit it: Linux lets an unprivileged thread lower its priority but not raise it again, and a
child process takes the policy of the thread that forked it. So they are started from one thread
that is never lowered (`spawn`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading

log = logging.getLogger(__name__)

PRIORITIES = ("idle", "normal")
DEFAULT_PRIORITY = "idle"

# One thread at the priority the process started with: every child process is forked from it.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-spawn")
_spawner_tid: int | None = None


def _spawner_thread_id() -> int:
    """Starts the spawner thread (before any drop, so it keeps the starting priority)."""
    global _spawner_tid
    if _spawner_tid is None:
        _spawner_tid = _spawner.submit(threading.get_native_id).result()
    return _spawner_tid


async def spawn(start, *args, **kwargs):
    """Runs start(*args, **kwargs), e.g. subprocess.Popen, on the spawner thread (started by
    lower_front_end before it lowers anything, or here at normal priority)."""
    return await asyncio.get_running_loop().run_in_executor(_spawner, lambda: start(*args, **kwargs))


def lower_front_end(priority: str) -> str:
    """Puts every thread of this process but the spawner at `priority`; threads started later
    inherit it from the thread that starts them. Returns what was done, for the log."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown CPU priority {priority!r}: expected one of {', '.join(PRIORITIES)}")
    if priority == "normal":
        return "normal (the front end competes for the cores with the engines)"
    if not hasattr(os, "SCHED_IDLE"):
        return "normal (this platform has no SCHED_IDLE)"
    keep = _spawner_thread_id()
    lowered = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == keep:
            continue
        try:
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            lowered += 1
        except ProcessLookupError:   # the thread ended meanwhile
            pass
        except OSError as exc:       # e.g. a seccomp profile that forbids it: serve on as it is
            log.warning("could not lower the front end's CPU priority: %s", exc)
            return f"normal ({exc})" if not lowered else f"idle on {lowered} threads only ({exc})"
    return f"idle (SCHED_IDLE on {lowered} threads; engines start at normal priority)"

"""The front end's CPU priority: by default it does not preempt the engines.

Why: an engine computing on the CPU splits each op of its step over every core (OpenMP, static
shares), so another thread that takes a core stalls the whole step for as long as it runs. On a
2-core host the front end's per-token work (a gRPC write and its wake-ups per streamed response)
landed almost one for one on the engine's decode step. The front end's work is elastic (a
request's tokens merge into one response while its previous one waits), the engine's is not.

- `batch` (the default): the front end's threads run at Linux's SCHED_BATCH. A waking batch
  thread never preempts a running engine thread: it takes a core when an engine thread sleeps
  (every OpenMP barrier, every gap between steps) or at the scheduler's next tick, and it keeps
  its fair share of the CPU. So it cannot starve behind engines pinned one per core whose
  threads never sleep (the demo's PD layout), where the running streams must keep flowing.
- `idle`: SCHED_IDLE, a core only when no normal thread wants one. A little faster beside one
  engine computing on every core (bench/RESULTS.md); but behind engines whose threads never
  sleep it gets almost nothing (weight 3 against 1024), and streams stall: only for hosts
  whose CPU engines all compute on every core.
- `normal`: the front end competes with the engines like any thread.

Processes the front end starts (engines; the private etcd starts before the drop) must not
inherit it: a child process takes the policy of the thread that forks it, and Linux lets an
unprivileged thread leave SCHED_IDLE only with a raised RLIMIT_NICE. So they are started from
one thread that is never lowered (`spawn`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading

log = logging.getLogger(__name__)

PRIORITIES = ("idle", "batch", "normal")
DEFAULT_PRIORITY = "batch"

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


def _set_threads(policy: int, keep: int | None = None) -> tuple[int, OSError | None]:
    """Puts every thread of this process but `keep` at `policy`: (how many, the error that stopped it)."""
    done = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == keep:
            continue
        try:
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))
            done += 1
        except ProcessLookupError:   # the thread ended meanwhile
            pass
        except OSError as exc:       # e.g. a seccomp profile that forbids it: run on as it is
            return done, exc
    return done, None


def lower_engine_worker() -> str:
    """In an engine worker, before its threads start: every thread but the engine's own runs at
    SCHED_BATCH (the asyncio and gRPC threads that stream its outputs, the tokenizer pool, the
    transfer engine's threads; they inherit it from the thread that starts them), so passing a
    step's outputs on never preempts the next step. The engine thread calls `as_compute_thread`.
    SCHED_BATCH keeps a fair share: on a core the engine thread never leaves (`cpu:N`), these
    threads still run at the scheduler's tick."""
    if not hasattr(os, "SCHED_BATCH"):
        return "normal (this platform has no SCHED_BATCH)"
    done, exc = _set_threads(os.SCHED_BATCH)
    return f"batch on {done} threads" + (f" only ({exc})" if exc else "")


def as_compute_thread() -> None:
    """The calling thread, and the OpenMP team it starts from now on, at normal priority (Linux
    lets a thread go from SCHED_BATCH back to SCHED_OTHER unprivileged)."""
    if hasattr(os, "SCHED_BATCH") and os.sched_getscheduler(0) == os.SCHED_BATCH:
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError as exc:
            log.warning("the engine thread stays at SCHED_BATCH: %s", exc)


def lower_front_end(priority: str) -> str:
    """Puts every thread of this process but the spawner at `priority`; threads started later
    inherit it from the thread that starts them. Returns what was done, for the log."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown CPU priority {priority!r}: expected one of {', '.join(PRIORITIES)}")
    if priority == "normal":
        return "normal (the front end competes for the cores with the engines)"
    # batch keeps its fair share and only waits to be scheduled; idle takes what is left
    policy = getattr(os, "SCHED_IDLE" if priority == "idle" else "SCHED_BATCH", None)
    if policy is None:
        return f"normal (this platform has no SCHED_{priority.upper()})"
    lowered, exc = _set_threads(policy, keep=_spawner_thread_id())
    if exc is not None:
        log.warning("could not lower the front end's CPU priority: %s", exc)
        return f"normal ({exc})" if not lowered else f"{priority} on {lowered} threads only ({exc})"
    return f"{priority} (SCHED_{priority.upper()} on {lowered} threads; engines start at normal priority)"

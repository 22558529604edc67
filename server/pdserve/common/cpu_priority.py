"""CPU priorities: the front end and an engine's helper threads never hold up an engine's step.

Why: an engine computing on the CPU splits each op of its step over every core (OpenMP, static
shares), so another thread that takes a core stalls the whole step for as long as it runs; on a
small host the front end's per-token work (a gRPC write and its wake-ups per streamed response)
lands on the engine's decode step. The front end's work is elastic (a request's tokens merge
into one response while its previous one waits), the engine's is not.

The front end (`--frontend-cpu-priority`):
- `batch`: Linux's SCHED_BATCH. A waking batch thread never preempts a running thread: it runs
  when an engine thread sleeps (every OpenMP barrier, every gap between steps) or at the
  scheduler's tick, and it keeps its fair share of the CPU, so it cannot starve.
- `idle`: SCHED_IDLE, a core only when no normal thread wants one. Beside one engine computing
  on every core it is the fastest (its threads sleep at every barrier); but behind engine
  threads that never sleep (engines pinned one per core, several engines sharing the cores) it
  gets almost nothing (weight 3 against 1024) and the streams stall.
- `auto` (the default): `batch` from the start; `idle` once the models present at startup are
  loaded (`settle`) if this node runs exactly one engine and it computes on every core
  (device `cpu`). Linux lets an unprivileged thread leave SCHED_IDLE only with a raised
  RLIMIT_NICE, so the choice is made once; an engine started later that breaks the rule is
  logged (`spawn_engine`).
- `normal`: the front end competes with the engines like any thread.

Processes the front end starts (engines; the private etcd starts before any drop) must not
inherit its policy: a child takes the policy of the thread that forks it. So they are started
from one thread that is never lowered (`spawn`).

An engine worker (`lower_engine_worker`, `as_compute_thread`): every thread but the engine thread
and its OpenMP team runs at SCHED_BATCH, so passing a step's outputs on never preempts a step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import subprocess
import threading

log = logging.getLogger(__name__)

PRIORITIES = ("auto", "batch", "idle", "normal")
DEFAULT_PRIORITY = "auto"

# One thread at the priority the process started with: every child process is forked from it.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-spawn")
_spawner_tid: int | None = None
_auto = False                                            # --frontend-cpu-priority auto
_front_end = "normal"                                    # the front end's policy now
_engines: list[tuple[subprocess.Popen, str]] = []        # engines started here, with their device
_warned = False


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


async def spawn_engine(device: str, *args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen(*args, **kwargs) of an engine on `device`, from the spawner thread; with
    `auto`, an engine that the idle front end should not sit beside is logged."""
    global _warned
    proc = await spawn(subprocess.Popen, *args, **kwargs)
    _engines.append((proc, device))
    if _auto and _front_end == "idle" and not _warned and not idle_is_safe(_live_engine_devices()):
        _warned = True
        log.warning("the front end runs at SCHED_IDLE (auto: this node ran one engine on every core) and cannot "
                    "go back; with engines on %s it may get too little CPU and streams may stall: restart with "
                    "--frontend-cpu-priority batch", ", ".join(_live_engine_devices()))
    return proc


def _live_engine_devices() -> list[str]:
    _engines[:] = [(p, d) for p, d in _engines if p.poll() is None]
    return [d for _, d in _engines]


def idle_is_safe(devices: list[str]) -> bool:
    """SCHED_IDLE suits the front end only beside a single engine computing on every core: its
    sleeping OpenMP threads leave a core at every barrier. Engines pinned to a core, several
    engines on the same cores, or an accelerator engine's host thread may never leave one."""
    return len(devices) == 1 and devices[0].strip() == "cpu"


def _policy_of(priority: str) -> int | None:
    return getattr(os, {"idle": "SCHED_IDLE", "batch": "SCHED_BATCH"}[priority], None)


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


def _lower(priority: str) -> str:
    """Every thread of the front end but the spawner at `priority` (idle or batch); threads
    started later inherit it from the thread that starts them."""
    global _front_end
    policy = _policy_of(priority)
    if policy is None:
        return f"normal (this platform has no SCHED_{priority.upper()})"
    lowered, exc = _set_threads(policy, keep=_spawner_thread_id())
    if exc is not None:
        log.warning("could not lower the front end's CPU priority: %s", exc)
        return f"normal ({exc})" if not lowered else f"{priority} on {lowered} threads only ({exc})"
    _front_end = priority
    return f"{priority} (SCHED_{priority.upper()} on {lowered} threads; engines start at normal priority)"


def lower_front_end(priority: str) -> str:
    """Applies --frontend-cpu-priority at startup, before any engine starts. Returns what was done,
    for the log."""
    global _auto
    if priority not in PRIORITIES:
        raise ValueError(f"unknown CPU priority {priority!r}: expected one of {', '.join(PRIORITIES)}")
    if priority == "normal":
        return "normal (the front end competes for the cores with the engines)"
    _auto = priority == "auto"
    done = _lower("batch" if _auto else priority)
    return f"auto: {done}; idle once loaded if this node runs one engine on every core" if _auto else done


def settle() -> str | None:
    """With `auto`, once the startup models are loaded: idle if this node runs one engine on every
    core, else it stays batch. Returns what was done, for the log (None: nothing to settle)."""
    if not _auto or _front_end == "idle":
        return None
    devices = _live_engine_devices()
    if not idle_is_safe(devices):
        return f"batch (engines on {', '.join(devices) or 'no device'})"
    return _lower("idle") + " (auto: one engine, computing on every core)"


def lower_engine_worker() -> str:
    """In an engine worker, before its threads start: every thread but the engine's own runs at
    SCHED_BATCH (the asyncio and gRPC threads that stream its outputs, the tokenizer pool, the
    transfer engine's threads; they inherit it from the thread that starts them). The engine
    thread calls `as_compute_thread`. SCHED_BATCH keeps a fair share: on a core the engine thread
    never leaves (`cpu:N`), these threads still run at the scheduler's tick."""
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

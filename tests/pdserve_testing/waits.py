"""Bounded waits on a condition: a test waits for the event it needs, never for a fixed time."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")
POLL_S = 0.2


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 60.0,
               detail: Callable[[], str] = lambda: "") -> T:
    """The predicate's first truthy value, polled until `timeout` seconds have passed; then
    TimeoutError naming what was awaited (and `detail()`, e.g. a server log)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")
        time.sleep(POLL_S)


def holds_for(predicate: Callable[[], object], what: str, seconds: float,
              detail: Callable[[], str] = lambda: "") -> None:
    """Checks that the predicate stays true for `seconds`, polling all along: for a test that
    shows something does NOT happen within a period the system defines (a cooldown, a stall
    limit); it fails the moment the predicate turns false."""
    end = time.monotonic() + seconds
    while True:
        assert predicate(), f"{what}: no longer true\n{detail()}"
        if time.monotonic() >= end:
            return
        time.sleep(POLL_S)

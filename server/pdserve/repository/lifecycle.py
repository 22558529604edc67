"""The lifecycle of one model version on this node, apart from the processes that serve it.

As Triton keeps its ModelLifeCycle apart from the repository manager: the manager decides what
should serve (repository/manager.py), a Deployment carries it out with its engines
(repository/supervisor.py; the processes are repository/engine_process.py), and this state
machine says where the version stands and why. Pure logic over an injected clock: every change
is a Transition value with its reason, which the deployment logs; events that do not apply in
the current state change nothing (a second stop, a drain of a version that never served).

    LOADING --up: every engine started and routable--> READY --drain--> DRAINING --stop--> UNLOADED
       |                                                  '-----------stop------------------^
       |--start failed: an engine could not start--> FAILED (its engines are stopped)
       '--stop: the load was given up (cancelled, or another version of the load failed)--> UNLOADED

While READY the deployment's watchdog restarts engines that die or freeze. A drain ends when
nothing routed here is in flight and no engine holds a request, or at its deadline
(drain_verdict): the engines are stopped either way.

A deployment served from the configs other nodes publish has no engines here, and no lifecycle
of its own on this node: it stays LOADING (the registry says whether it serves).
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from typing import Callable


class VersionState(enum.Enum):
    LOADING = "LOADING"      # engines starting; not routable
    READY = "READY"          # engines routable, the watchdog restarts any that die
    DRAINING = "DRAINING"    # routers no longer choose its engines; the requests they hold finish
    UNLOADED = "UNLOADED"    # engines stopped
    FAILED = "FAILED"        # the load failed; engines stopped


class Event(enum.Enum):
    UP = "up"                        # every engine started and is routable
    START_FAILED = "start_failed"    # an engine could not start
    DRAIN = "drain"                  # the manager retires the version (a reload, an unload)
    STOP = "stop"                    # its engines are stopped


TRANSITIONS: dict[tuple[VersionState, Event], VersionState] = {
    (VersionState.LOADING, Event.UP): VersionState.READY,
    (VersionState.LOADING, Event.START_FAILED): VersionState.FAILED,
    (VersionState.LOADING, Event.STOP): VersionState.UNLOADED,
    (VersionState.READY, Event.DRAIN): VersionState.DRAINING,
    (VersionState.READY, Event.STOP): VersionState.UNLOADED,
    (VersionState.DRAINING, Event.STOP): VersionState.UNLOADED,
}


def next_state(state: VersionState, event: Event) -> VersionState | None:
    """The state an event leads to from `state`; None when it does not apply there."""
    return TRANSITIONS.get((state, event))


@dataclass(frozen=True)
class Transition:
    source: VersionState
    target: VersionState
    event: Event
    reason: str
    at: float


class DrainVerdict(enum.Enum):
    WAIT = "wait"              # requests are still held
    DRAINED = "drained"        # nothing in flight, no engine holds a request
    TIMED_OUT = "timed_out"    # past the drain's deadline: stop anyway


class Lifecycle:
    """One model version's state on this node, the reason it got there, and since when."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.state = VersionState.LOADING
        self.reason = "loading"
        self.since = clock()
        self.drain_deadline = math.inf
        self.history: list[Transition] = []

    @property
    def serving(self) -> bool:
        """READY: routable, and its engines are restarted when they die."""
        return self.state is VersionState.READY

    def on(self, event: Event, reason: str) -> Transition | None:
        """Applies the event: the transition it makes, or None when it does not apply now."""
        target = next_state(self.state, event)
        if target is None:
            return None
        transition = Transition(self.state, target, event, reason, self.clock())
        self.state, self.reason, self.since = target, reason, transition.at
        self.history.append(transition)
        return transition

    def up(self, reason: str = "every engine started and routable") -> Transition | None:
        return self.on(Event.UP, reason)

    def start_failed(self, reason: str) -> Transition | None:
        return self.on(Event.START_FAILED, reason)

    def drain(self, timeout_s: float, reason: str = "retired") -> Transition | None:
        """Starts a drain that ends at the latest timeout_s from now."""
        transition = self.on(Event.DRAIN, reason)
        if transition is not None:
            self.drain_deadline = transition.at + timeout_s
        return transition

    def stop(self, reason: str = "stopped") -> Transition | None:
        return self.on(Event.STOP, reason)

    def drain_verdict(self, idle: bool) -> DrainVerdict:
        """Whether a drain is over: `idle` when nothing routed here is in flight and no engine
        holds a request. Outside DRAINING there is nothing to wait for."""
        if idle or self.state is not VersionState.DRAINING:
            return DrainVerdict.DRAINED
        if self.clock() >= self.drain_deadline:
            return DrainVerdict.TIMED_OUT
        return DrainVerdict.WAIT

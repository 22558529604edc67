"""Chooses the engine that serves a request.

Policies are pluggable: round-robin, and least-load (requests this front end has in flight
on each engine plus the queue the engine last reported, then free KV blocks).
"""
from __future__ import annotations

import itertools
from collections import defaultdict

from pdserve.supervisor import Deployment, EngineProcess


class NoEngineAvailable(RuntimeError):
    pass


class RoundRobinPolicy:
    def __init__(self):
        self._counter = itertools.count()

    def choose(self, engines: list[EngineProcess], inflight: dict[str, int]) -> EngineProcess:
        return engines[next(self._counter) % len(engines)]


class LeastLoadPolicy:
    def __init__(self):
        self._tie_break = itertools.count()

    def choose(self, engines: list[EngineProcess], inflight: dict[str, int]) -> EngineProcess:
        def load(engine: EngineProcess):
            stats = engine.client.last_stats if engine.client else None
            waiting = stats.num_waiting if stats else 0
            free = stats.num_free_blocks if stats else 0
            return inflight[engine.instance_id] + waiting, -free
        best = min(load(e) for e in engines)
        tied = [e for e in engines if load(e) == best]
        return tied[next(self._tie_break) % len(tied)]


POLICIES = {"round_robin": RoundRobinPolicy, "least_load": LeastLoadPolicy}


class Router:
    def __init__(self, policy: str = "least_load"):
        self.policy = POLICIES[policy]()
        self.inflight: dict[str, int] = defaultdict(int)

    def choose(self, deployment: Deployment) -> EngineProcess:
        """An engine that generates: DECODE or BOTH. (DECODE engines prefill locally.)"""
        engines = [e for e in deployment.live_engines() if e.instance.role in ("BOTH", "DECODE")]
        if not engines:
            raise NoEngineAvailable(f"model '{deployment.name}' version {deployment.version} has no live engine "
                                    "that can generate; check the engine logs and the instance_group devices")
        return self.policy.choose(engines, self.inflight)

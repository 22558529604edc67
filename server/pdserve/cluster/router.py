"""Chooses the engines that serve a request, across every node of the cluster.

Per request: a DECODE (or BOTH) engine by load, and, when the choice is a DECODE engine and
a PREFILL engine is alive, a PREFILL engine by queued prefill work. No prefill engine: the
decode engine prefills locally. No engine that can generate: UNAVAILABLE at once.
Policies are pluggable (round_robin, least_load) and pure: they see records and a load
function, so they are unit-tested without processes.
"""
from __future__ import annotations

import contextlib
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator

from pdserve.cluster.engine_client import EngineClients
from pdserve.cluster.registry import RegistryView
from pdserve.common.errors import Cause, ServeError
from pdserve.common.records import EngineRecord

LoadFn = Callable[[EngineRecord], tuple]


class RoundRobinPolicy:
    """Takes the engines in turn, one turn counter per model and role (a bounded set)."""

    def __init__(self):
        self._turns: dict[tuple[str, str, str], itertools.count] = defaultdict(itertools.count)

    def choose(self, engines: list[EngineRecord], load: LoadFn) -> EngineRecord:
        first = engines[0]
        ordered = sorted(engines, key=lambda e: e.instance_id)
        return ordered[next(self._turns[(first.model, first.version, first.role)]) % len(ordered)]


class LeastLoadPolicy:
    """The engine with the lowest load; ties are broken in turn."""

    def __init__(self):
        self._tie_break = itertools.count()

    def choose(self, engines: list[EngineRecord], load: LoadFn) -> EngineRecord:
        scores = [load(e) for e in engines]
        best = min(scores)
        tied = [e for e, score in zip(engines, scores) if score == best]
        return tied[next(self._tie_break) % len(tied)]


POLICIES = {"round_robin": RoundRobinPolicy, "least_load": LeastLoadPolicy}


@dataclass(frozen=True)
class Route:
    decode: EngineRecord
    prefill: EngineRecord | None = None   # None: the decode engine prefills itself

    @property
    def instance_ids(self) -> list[str]:
        return [self.decode.instance_id] + ([self.prefill.instance_id] if self.prefill else [])


class Router:
    def __init__(self, registry: RegistryView, clients: EngineClients, policy: str = "least_load"):
        self.registry = registry
        self.clients = clients
        self.decode_policy = POLICIES[policy]()
        self.prefill_policy = POLICIES[policy]()
        self.inflight: Counter[str] = Counter()   # requests this front end has on each engine

    def _stats(self, record: EngineRecord):
        client = self.clients.peek(record.address)
        return client.last_stats if client else None

    def decode_load(self, record: EngineRecord) -> tuple:
        """Requests in flight from here plus the engine's queue, then free KV blocks."""
        stats = self._stats(record)
        waiting = (stats.num_waiting + stats.num_awaiting_kv) if stats else 0
        return self.inflight[record.instance_id] + waiting, -(stats.num_free_blocks if stats else 0)

    def prefill_load(self, record: EngineRecord) -> tuple:
        """Prompt tokens queued on the prefill engine, then requests in flight from here."""
        stats = self._stats(record)
        return (stats.waiting_prefill_tokens if stats else 0), self.inflight[record.instance_id]

    def _reachable(self, engines: list[EngineRecord], exclude: frozenset[str] = frozenset()) -> list[EngineRecord]:
        """Engines not excluded and not suspect; the suspect ones only when nothing else is left."""
        engines = [e for e in engines if e.instance_id not in exclude]
        healthy = [e for e in engines if not ((c := self.clients.peek(e.address)) and c.suspect)]
        return healthy or engines

    def choose(self, model: str, version: str, exclude: frozenset[str] = frozenset()) -> Route:
        """exclude: instance ids that already failed this request."""
        decoders = self._reachable(self.registry.engines(model, version, roles=("BOTH", "DECODE")), exclude)
        if not decoders:
            raise ServeError(Cause.NO_ENGINE,
                             f"model '{model}' version {version} has no live engine that can generate "
                             "(no DECODE or BOTH instance is ready in the cluster); check the engine logs "
                             "and the instance_group devices")
        decode = self.decode_policy.choose(decoders, self.decode_load)
        if decode.role != "DECODE":
            return Route(decode)
        prefills = self._reachable(self.registry.engines(model, version, roles=("PREFILL",)), exclude)
        if not prefills:
            return Route(decode)  # graceful fallback: the decode engine prefills locally
        return Route(decode, self.prefill_policy.choose(prefills, self.prefill_load))

    @contextlib.contextmanager
    def track(self, chosen: Route) -> Iterator[Route]:
        """Counts a request on its engines until it ends."""
        for instance_id in chosen.instance_ids:
            self.inflight[instance_id] += 1
        try:
            yield chosen
        finally:
            for instance_id in chosen.instance_ids:
                self.inflight[instance_id] -= 1
                if not self.inflight[instance_id]:
                    del self.inflight[instance_id]

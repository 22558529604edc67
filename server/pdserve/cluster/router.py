"""Chooses the engines that serve a request, across every node of the cluster.

Per request: a DECODE (or BOTH) engine by load, and, when the choice is a DECODE engine and
a PREFILL engine is alive, a PREFILL engine by queued prefill work. No prefill engine: the
decode engine prefills locally. No engine that can generate: UNAVAILABLE at once.
Policies are pluggable: round-robin and least-load at least.
"""
from __future__ import annotations

import itertools
from collections import defaultdict

from pdserve.cluster.registry import RegistryView
from pdserve.common.records import EngineRecord
from pdserve.cluster.engine_client import EngineClients


class NoEngineAvailable(RuntimeError):
    pass


class RoundRobinPolicy:
    def __init__(self):
        self._counters = defaultdict(itertools.count)

    def choose(self, engines: list[EngineRecord], load) -> EngineRecord:
        key = tuple(sorted(e.instance_id for e in engines))
        return engines[next(self._counters[key]) % len(engines)]


class LeastLoadPolicy:
    def __init__(self):
        self._tie_break = itertools.count()

    def choose(self, engines: list[EngineRecord], load) -> EngineRecord:
        scores = [load(e) for e in engines]
        best = min(scores)
        tied = [e for e, score in zip(engines, scores) if score == best]
        return tied[next(self._tie_break) % len(tied)]


POLICIES = {"round_robin": RoundRobinPolicy, "least_load": LeastLoadPolicy}


class Router:
    def __init__(self, registry: RegistryView, clients: EngineClients, policy: str = "least_load"):
        self.registry = registry
        self.clients = clients
        self.decode_policy = POLICIES[policy]()
        self.prefill_policy = POLICIES[policy]()
        self.inflight: dict[str, int] = defaultdict(int)   # requests this front end has on each engine

    def _stats(self, record: EngineRecord):
        client = self.clients.peek(record.address)
        return client.last_stats if client else None

    def decode_load(self, record: EngineRecord):
        """Requests in flight from here plus the engine's queue, then free KV blocks."""
        stats = self._stats(record)
        waiting = (stats.num_waiting + stats.num_awaiting_kv) if stats else 0
        return self.inflight[record.instance_id] + waiting, -(stats.num_free_blocks if stats else 0)

    def prefill_load(self, record: EngineRecord):
        """Prompt tokens queued on the prefill engine, then requests in flight from here."""
        stats = self._stats(record)
        return (stats.waiting_prefill_tokens if stats else 0), self.inflight[record.instance_id]

    def choose(self, model: str, version: str) -> tuple[EngineRecord, EngineRecord | None]:
        decoders = self.registry.engines(model, version, roles=("BOTH", "DECODE"))
        if not decoders:
            raise NoEngineAvailable(f"model '{model}' version {version} has no live engine that can generate "
                                    "(no DECODE or BOTH instance is ready in the cluster); check the engine logs "
                                    "and the instance_group devices")
        decode = self.decode_policy.choose(decoders, self.decode_load)
        if decode.role != "DECODE":
            return decode, None
        prefills = self.registry.engines(model, version, roles=("PREFILL",))
        if not prefills:
            return decode, None  # graceful fallback: the decode engine prefills locally
        return decode, self.prefill_policy.choose(prefills, self.prefill_load)

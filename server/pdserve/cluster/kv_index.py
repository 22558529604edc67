"""Which engine holds which KV block, as this front end learned it from the engines' KV events.

Every engine content-addresses its full KV blocks with common/block_hash.py and reports the
changes of its prefix cache through its Stats RPC (engine/kv_events.py: the net change of each
hash since the caller's cursor, or the whole set, flagged reset). EngineClient.stats() applies
each answer here; the router asks match() how many leading blocks of a prompt each engine holds.
Engines are named by their engine RPC address (one process per address at a time: a new
incarnation at the same address starts its view over, see EngineClients.sync).
"""
from __future__ import annotations

from typing import Iterable, Sequence


class KVIndex:
    def __init__(self):
        self._holders: dict[int, set[str]] = {}   # block hash -> engines holding it
        self._held: dict[str, set[int]] = {}      # engine -> block hashes it holds

    def apply(self, engine: str, stored: Iterable[int], removed: Iterable[int] = (), reset: bool = False) -> None:
        """One Stats answer's events: `stored` hashes are now held, `removed` no longer; with
        `reset`, `stored` is the engine's whole set and replaces what was known of it."""
        if reset:
            self.drop(engine)
        held = self._held.get(engine)
        if held is None:
            held = self._held[engine] = set()
        holders = self._holders
        for h in removed:
            if h in held:
                held.discard(h)
                owners = holders[h]
                owners.discard(engine)
                if not owners:
                    del holders[h]
        for h in stored:
            if h not in held:
                held.add(h)
                owners = holders.get(h)
                if owners is None:
                    holders[h] = {engine}
                else:
                    owners.add(engine)
        if not held:
            del self._held[engine]

    def drop(self, engine: str) -> None:
        """Forgets every block of an engine (it left, or its view starts over)."""
        holders = self._holders
        for h in self._held.pop(engine, ()):
            owners = holders[h]
            owners.discard(engine)
            if not owners:
                del holders[h]

    def match(self, prompt_hashes: Sequence[int]) -> dict[str, int]:
        """Engine -> number of leading blocks of the prompt it holds (engines holding none are
        absent). The work is proportional to the holders of the matched blocks: the engines still
        matching shrink block by block, and the walk stops when none is left."""
        holders = self._holders
        matched: dict[str, int] = {}
        active: set[str] | None = None
        depth = 0
        for depth, h in enumerate(prompt_hashes):
            owners = holders.get(h)
            if not owners:
                break
            if active is None:
                active = set(owners)
                continue
            if len(owners) < len(active) or not active <= owners:
                still = active & owners
                for engine in active - still:
                    matched[engine] = depth
                active = still
                if not active:
                    return matched
        else:
            depth = len(prompt_hashes)
        for engine in active or ():
            matched[engine] = depth
        return matched

    def blocks(self, engine: str) -> int:
        """How many blocks this front end believes the engine holds."""
        return len(self._held.get(engine, ()))

    def engines(self) -> list[str]:
        return list(self._held)

    def __len__(self) -> int:
        """Distinct block hashes held anywhere."""
        return len(self._holders)

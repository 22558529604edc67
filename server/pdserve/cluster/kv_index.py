"""Which engine holds which KV block, as this front end learned it from the engines' KV events.

Every engine content-addresses its full KV blocks with common/block_hash.py and reports the
changes of its prefix cache through its Stats RPC (engine/kv_events.py: the net change of each
hash since the caller's cursor, or the whole set, flagged reset). The load plane
(cluster/load.py) applies each answer here; the router asks match() how many leading blocks of
a prompt each engine holds. Engines are named by their engine RPC address (one process per
address at a time: a new incarnation at the same address starts its view over, see
LoadPlane.sync).
"""
from __future__ import annotations

from typing import Iterable, Sequence


class KVIndex:
    def __init__(self, common: int = 32, bisect: int = 4):
        self.common = common   # match(): a block held by more engines than this is a common prefix
        self.bisect = bisect   # match(): this many holders or fewer are bisected, not walked
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
        absent), in time proportional to the matched blocks and their holders, not to the
        engines.

        The walk follows the chain from block 0 and stops when no holder is left. A prefix cache
        evicts a block's descendants before the block, so along one chain an engine's blocks
        are a prefix; hence (1) the holders are compared only when their number changes (as many
        holders: the same ones), and (2) a common prefix, blocks held by more than `common`
        engines (a system prompt everywhere), is walked without following its holders: the
        holders of the first block past it are credited from block 0, and engines that hold
        only the common part are not listed (it does not tell them apart). An engine whose cache
        broke the prefix rule can be credited blocks it lacks: that costs a routing choice,
        never wrong KV (the engine compares token ids)."""
        get, n, depth = self._holders.get, len(prompt_hashes), 0
        while True:   # past the common prefix
            if depth == n:
                return {}
            owners = get(prompt_hashes[depth])
            if owners is None:
                return {}
            depth += 1
            if len(owners) <= self.common:
                break
        active, count = set(owners), len(owners)
        matched: dict[str, int] = {}
        if count <= self.bisect:
            held = self._held
            for engine in active:
                blocks, lo, hi = held[engine], depth, n   # it holds the blocks before lo
                while lo < hi:
                    mid = (lo + hi + 1) >> 1
                    if prompt_hashes[mid - 1] in blocks:
                        lo = mid
                    else:
                        hi = mid - 1
                matched[engine] = lo
            return matched
        while depth < n:
            owners = get(prompt_hashes[depth])
            if owners is None:
                break
            if len(owners) != count:
                still = active & owners
                if len(still) != count:
                    for engine in active - still:
                        matched[engine] = depth
                    active, count = still, len(still)
                    if not count:
                        return matched
            depth += 1
        for engine in active:
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

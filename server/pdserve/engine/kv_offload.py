"""A second tier of KV blocks under the prefix cache: blocks the pool evicts, kept in host memory.

The compute pool stays small (its blocks are the ones steps read), and a cached block it evicts
is not lost: its KV, all layers, is copied here before the pool reuses the block. The tier is
content-addressed with the pool's block hashes (common/block_hash.py) and bounded in bytes, least
recently used going first. When a prompt's cached prefix ends in the pool, it may continue here:
those blocks are copied back into fresh pool blocks at admission, before any forward reads them.
Token ids are compared on a hit as the pool does, so a hash collision is a miss, never wrong KV.

On `cpu` engines the tier and the pool share one memory, so each copy is one synchronous memcpy
on the engine thread at the moment the block manager asks for it (eviction, admission): no step
can read or write a block while its copy is pending, and no bookkeeping outlives the call.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class KVTierStats:
    """One tier's figures (cumulative, except the occupancy)."""
    tier: str
    hit_tokens: int = 0         # prompt tokens whose KV came from this tier instead of being computed
    saved_bytes: int = 0        # KV written into the tier (pool -> tier)
    loaded_bytes: int = 0       # KV read back into the pool (tier -> pool)
    copy_seconds: float = 0.0   # time spent copying, both ways
    used_bytes: int = 0         # occupancy now
    capacity_bytes: int = 0


class HostKVTier:
    """Evicted pool blocks in host memory: block hash -> one slot of a preallocated store, LRU."""

    name = "host"

    def __init__(self, pool: torch.Tensor, capacity_bytes: int, block_size: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.pool = pool                                    # [num_blocks, layers, 2, block_size, heads, dim]
        self.block_size = block_size
        self.block_bytes = pool[0].numel() * pool.element_size()
        num_slots = capacity_bytes // self.block_bytes
        # torch.empty: on CPU, pages are committed only as slots are first written.
        self.store = torch.empty((num_slots, *pool.shape[1:]), dtype=pool.dtype, device="cpu")
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.entries: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()  # hash -> (slot, tokens)
        self.clock = clock
        self.hit_tokens = self.saved_bytes = self.loaded_bytes = 0
        self.copy_seconds = 0.0

    @property
    def num_slots(self) -> int:
        return self.store.shape[0]

    def contains(self, block_hash: int, tokens: tuple[int, ...]) -> bool:
        entry = self.entries.get(block_hash)
        return entry is not None and entry[1] == tokens

    def save(self, block: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        """Keeps a block the pool is about to reuse (its KV is still in the pool)."""
        if self.contains(block_hash, tokens):   # loaded back earlier and unchanged since
            self.entries.move_to_end(block_hash)
            return
        if block_hash in self.entries:           # a collision: the newer content wins
            slot, _ = self.entries.pop(block_hash)
        elif self.free_slots:
            slot = self.free_slots.pop()
        elif self.entries:
            _, (slot, _) = self.entries.popitem(last=False)
        else:
            return                               # a tier smaller than one block keeps nothing
        start = self.clock()
        self.store[slot].copy_(self.pool[block])
        self.copy_seconds += self.clock() - start
        self.saved_bytes += self.block_bytes
        self.entries[block_hash] = (slot, tokens)

    def fetch(self, hashes: list[int]) -> torch.Tensor:
        """The KV of these blocks (all found by contains), copied out of the tier, so that the
        evictions that make room for them in the pool may reuse their slots meanwhile."""
        slots = []
        for h in hashes:
            self.entries.move_to_end(h)
            slots.append(self.entries[h][0])
        start = self.clock()
        staged = self.store[torch.tensor(slots)]
        self.copy_seconds += self.clock() - start
        return staged

    def restore(self, staged: torch.Tensor, blocks: list[int]) -> None:
        """Writes fetched KV into fresh pool blocks."""
        start = self.clock()
        self.pool[torch.tensor(blocks, device=self.pool.device)] = staged.to(self.pool.device)
        self.copy_seconds += self.clock() - start
        self.loaded_bytes += len(blocks) * self.block_bytes
        self.hit_tokens += len(blocks) * self.block_size

    def stats(self) -> KVTierStats:
        return KVTierStats(self.name, hit_tokens=self.hit_tokens, saved_bytes=self.saved_bytes,
                           loaded_bytes=self.loaded_bytes, copy_seconds=self.copy_seconds,
                           used_bytes=len(self.entries) * self.block_bytes,
                           capacity_bytes=self.num_slots * self.block_bytes)

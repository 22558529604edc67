"""Tiers of KV blocks under the prefix cache: blocks the pool evicts, kept in host memory and on disk.

The compute pool stays small (its blocks are the ones steps read), and a cached block it evicts
is not lost: its KV, all layers, goes to the first tier (host memory, kv_offload_host_gb), and
what that tier lets go goes to the next (disk, kv_offload_disk_gb, engine/kv_disk.py). Tiers are
content-addressed with the pool's block hashes (common/block_hash.py) and bounded in bytes, least
recently used going first. When a prompt's cached prefix ends in the pool, it may continue in the
tiers: those blocks are copied back into fresh pool blocks at admission, before any forward reads
them. Token ids are compared on a hit as the pool does, so a hash collision is a miss, never wrong
KV; a block a tier cannot give back intact (a corrupt or vanished file) ends the prefix there.

On `cpu` engines the host tier and the pool share one memory, so its copies are synchronous
memcpys on the engine thread at the moment the block manager asks for them (eviction, admission):
no step can read or write a block while its copy is pending. The disk tier copies a block out at
once too, and writes it from its own thread.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from pdserve.engine.config import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVTierStats:
    """One tier's figures (cumulative, except the occupancy)."""
    tier: str
    hit_tokens: int = 0         # prompt tokens whose KV came from this tier instead of being computed
    saved_bytes: int = 0        # KV written into the tier (pool or the tier above -> tier)
    loaded_bytes: int = 0       # KV read back into the pool (tier -> pool)
    copy_seconds: float = 0.0   # time spent copying, both ways (the disk tier's writes included)
    used_bytes: int = 0         # occupancy now
    capacity_bytes: int = 0


class TierFigures:
    """A tier's cumulative figures. The disk and store tiers' writer threads add to them beside
    the engine thread, hence the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hit_tokens = self.saved_bytes = self.loaded_bytes = 0
        self.copy_seconds = 0.0

    def copied(self, seconds: float, saved_bytes: int = 0) -> None:
        with self.lock:
            self.copy_seconds += seconds
            self.saved_bytes += saved_bytes

    def loaded(self, num_tokens: int, num_bytes: int, seconds: float) -> None:
        with self.lock:
            self.hit_tokens += num_tokens
            self.loaded_bytes += num_bytes
            self.copy_seconds += seconds

    def stats(self, tier: str, used_bytes: int, capacity_bytes: int) -> KVTierStats:
        with self.lock:
            return KVTierStats(tier, self.hit_tokens, self.saved_bytes, self.loaded_bytes, self.copy_seconds,
                               used_bytes, capacity_bytes)


class Tier(Protocol):
    """One tier: blocks by hash, each the KV of all layers of one pool block."""
    name: str
    figures: TierFigures

    def contains(self, block_hash: int, tokens: tuple[int, ...]) -> bool: ...
    def put(self, block_hash: int, tokens: tuple[int, ...], kv: torch.Tensor) -> None: ...
    def get(self, block_hash: int) -> torch.Tensor | None: ...
    def stats(self) -> KVTierStats: ...


class HostKVTier:
    """Evicted pool blocks in host memory: block hash -> one slot of a preallocated store, LRU.
    The block it lets go for a new one goes to the tier below, if any."""

    name = "host"

    def __init__(self, block_shape: torch.Size, dtype: torch.dtype, capacity_bytes: int, block_size: int,
                 below: Tier | None = None, clock: Callable[[], float] = time.perf_counter):
        self.block_size = block_size
        self.block_bytes = math.prod(block_shape) * dtype.itemsize
        num_slots = capacity_bytes // self.block_bytes
        # torch.empty: on CPU, pages are committed only as slots are first written.
        self.store = torch.empty((num_slots, *block_shape), dtype=dtype, device="cpu")
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.entries: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()  # hash -> (slot, tokens)
        self.below = below
        self.clock = clock
        self.figures = TierFigures()

    @property
    def num_slots(self) -> int:
        return self.store.shape[0]

    def contains(self, block_hash: int, tokens: tuple[int, ...]) -> bool:
        entry = self.entries.get(block_hash)
        return entry is not None and entry[1] == tokens

    def put(self, block_hash: int, tokens: tuple[int, ...], kv: torch.Tensor) -> None:
        """Keeps a block (kv is read now: the caller may reuse its memory right after)."""
        if self.contains(block_hash, tokens):   # loaded back earlier and unchanged since
            self.entries.move_to_end(block_hash)
            return
        if block_hash in self.entries:           # a collision: the newer content wins
            slot, _ = self.entries.pop(block_hash)
        elif self.free_slots:
            slot = self.free_slots.pop()
        elif self.entries:
            old_hash, (slot, old_tokens) = self.entries.popitem(last=False)
            if self.below is not None:
                self.below.put(old_hash, old_tokens, self.store[slot])
        else:                                    # a tier smaller than one block passes blocks on
            if self.below is not None:
                self.below.put(block_hash, tokens, kv)
            return
        start = self.clock()
        self.store[slot].copy_(kv)
        self.figures.copied(self.clock() - start, self.block_bytes)
        self.entries[block_hash] = (slot, tokens)

    def get(self, block_hash: int) -> torch.Tensor:
        """A copy of the block's KV, so that the evictions that make room for it in the pool may
        reuse its slot meanwhile."""
        self.entries.move_to_end(block_hash)
        start = self.clock()
        kv = self.store[self.entries[block_hash][0]].clone()
        self.figures.copied(self.clock() - start)
        return kv

    def stats(self) -> KVTierStats:
        return self.figures.stats(self.name, len(self.entries) * self.block_bytes, self.num_slots * self.block_bytes)


class KVTiers:
    """The tiers under one pool, top first, as the block manager sees them (its OffloadTier)."""

    def __init__(self, pool: torch.Tensor, tiers: list[Tier], block_size: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.pool = pool                                    # [num_blocks, layers, 2, block_size, heads, dim]
        self.tiers = tiers
        self.block_size = block_size
        self.block_bytes = pool[0].numel() * pool.element_size()
        self.clock = clock

    def tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    def contains(self, block_hash: int, tokens: tuple[int, ...]) -> bool:
        return any(t.contains(block_hash, tokens) for t in self.tiers)

    def save(self, block: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        """The pool is about to reuse this block (its KV is still there)."""
        self.tiers[0].put(block_hash, tokens, self.pool[block])

    def computed(self, block: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        """The block's KV was just computed (or loaded): a write-through tier (the cluster's store,
        engine/kv_store.py) takes it now, so that other engines find it before this pool evicts it."""
        for t in self.tiers:
            if getattr(t, "write_through", False):
                t.put(block_hash, tokens, self.pool[block])

    def fetch(self, blocks: list[tuple[int, tuple[int, ...]]]) -> list[tuple[Tier, torch.Tensor]]:
        """The KV of these blocks ((hash, tokens), all found by contains), read out of their tiers,
        up to the first a tier could not give back: a shorter answer means the prefix ends there."""
        staged = []
        for block_hash, tokens in blocks:
            tier = next((t for t in self.tiers if t.contains(block_hash, tokens)), None)
            kv = tier.get(block_hash) if tier is not None else None
            if kv is None:
                break
            staged.append((tier, kv))
        return staged

    def restore(self, staged: list[tuple[Tier, torch.Tensor]], blocks: list[int]) -> None:
        """Writes fetched KV into fresh pool blocks."""
        for (tier, kv), block in zip(staged, blocks):
            start = self.clock()
            self.pool[block].copy_(kv)
            tier.figures.loaded(self.block_size, self.block_bytes, self.clock() - start)

    def stats(self) -> tuple[KVTierStats, ...]:
        return tuple(t.stats() for t in self.tiers)

    def close(self) -> None:
        for t in self.tiers:
            getattr(t, "close", lambda: None)()


def build_tiers(cfg: EngineConfig, pool: torch.Tensor, block_size: int) -> KVTiers | None:
    """The tiers the config asks for under this pool (None: none)."""
    from pdserve.engine.kv_disk import DiskKVTier   # here: kv_disk.py takes KVTierStats from this module

    from pdserve.engine import kv_store

    for key in ("kv_offload_host_gb", "kv_offload_disk_gb", "kv_store_gb"):
        value = getattr(cfg, key)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} is {value}; give GiB (0: no tier)")
    if cfg.kv_offload_disk_gb > 0 and not cfg.kv_offload_disk_path:
        raise ValueError("kv_offload_disk_gb is set but kv_offload_disk_path is not; name a directory for "
                         "the disk tier's block files")
    if cfg.kv_store not in ("", "none", "mooncake"):
        raise ValueError(f"kv_store is {cfg.kv_store!r}; use mooncake (or none)")
    store_wanted = cfg.kv_store == "mooncake" and cfg.kv_store_gb > 0
    if store_wanted and not cfg.kv_store_endpoint:
        raise ValueError("kv_store is mooncake but no master is known: pdserve fills kv_store_endpoint (its own "
                         "master, or --kv-store-endpoint); an engine outside pdserve names one")
    wanted = cfg.kv_offload_host_gb > 0 or cfg.kv_offload_disk_gb > 0 or store_wanted
    if not wanted or not cfg.enable_prefix_caching:
        return None
    if pool.device.type != "cpu":
        log.warning("the KV offload tiers are implemented for cpu engines only so far; %s runs without them",
                    pool.device)
        return None
    tiers: list[Tier] = []
    block_shape, dtype = pool.shape[1:], pool.dtype
    disk = None
    if cfg.kv_offload_disk_gb > 0:
        disk = DiskKVTier(cfg.kv_offload_disk_path, int(cfg.kv_offload_disk_gb * 2**30), block_shape, dtype,
                          block_size)
        log.info("KV disk tier: %.1f GiB of block files in %s", cfg.kv_offload_disk_gb, disk.directory)
    if cfg.kv_offload_host_gb > 0:
        host = HostKVTier(block_shape, dtype, int(cfg.kv_offload_host_gb * 2**30), block_size, below=disk)
        log.info("KV host tier: %d blocks (%.1f MiB)", host.num_slots, host.num_slots * host.block_bytes / 2**20)
        tiers.append(host)
    if disk is not None:
        tiers.append(disk)
    if store_wanted:
        segment = int(cfg.kv_store_gb * 2**30)
        client = kv_store.connect(cfg.kv_store_endpoint, segment)
        if client is not None:
            namespace = kv_store.model_namespace(cfg.model_path, str(dtype), tuple(block_shape), block_size,
                                                 cfg.quantization)
            tiers.append(kv_store.StoreKVTier(client, namespace, block_shape, dtype, block_size, segment))
            log.info("KV store tier: Mooncake master %s, %.1f GiB lent", cfg.kv_store_endpoint, cfg.kv_store_gb)
    return KVTiers(pool, tiers, block_size) if tiers else None

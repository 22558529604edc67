"""The KV tier shared by the cluster: blocks in Mooncake Store, below every engine's own tiers.

An engine with `kv_store: mooncake` joins the store of its cluster (the mooncake_master that
pdserve started or was given, common/mooncake_master.py) and lends it kv_store_gb of its memory.
Every block it computes goes to the store (write-through: a prefix is shared as soon as it is
computed, not when a pool evicts it), so a prompt computed on one node is loaded, not computed,
on any other. Keys are the model's fingerprint and the block hash: engines of different models,
weights, dtypes or block sizes never read each other's blocks. Values are the disk tier's block
record (engine/kv_disk.py: header, token ids, CRC-32), so a hash collision, a torn or foreign
value is a miss.

Puts never block a step: the block is copied out at once and written by a writer thread (dropped
when the writer is behind). Lookups and gets run on the engine thread at admission. A store that
fails (its master gone, a put refused) is a miss and nothing else: the tier stays off for a
backoff, answering every lookup "not here" without asking, then tries again.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections import OrderedDict
from typing import Callable, Protocol

import torch

from pdserve.engine.kv_disk import BlockWriter, record_parts, unpack_record
from pdserve.engine.kv_events import KVEventLog
from pdserve.engine.kv_offload import KVTierStats, TierFigures

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 64 * 2**20
KNOWN_BLOCKS = 1 << 16           # hashes remembered as in the store (put or read here): not put again
BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
LOCAL_BUFFER_BYTES = 16 * 2**20  # Mooncake's staging buffer of one client


class StoreClient(Protocol):
    """What the tier asks of Mooncake's MooncakeDistributedStore (and tests of a stand-in)."""
    def put(self, key: str, value) -> int: ...          # 0, or a negative error code
    def get(self, key: str) -> bytes: ...               # b"" when absent or on error
    def is_exist(self, key: str) -> int: ...            # 1, 0, or a negative error code


class StoreKVTier:
    name = "store"
    write_through = True      # KVTiers.computed hands it every block as soon as its KV is computed

    def __init__(self, client: StoreClient, namespace: str, block_shape: torch.Size, dtype: torch.dtype,
                 block_size: int, capacity_bytes: int = 0, clock: Callable[[], float] = time.monotonic):
        self.client, self.namespace = client, namespace
        self.block_shape, self.dtype, self.block_size = tuple(block_shape), dtype, block_size
        self.block_bytes = math.prod(block_shape) * dtype.itemsize
        self.capacity_bytes = capacity_bytes     # what this engine lends the store (the store is shared)
        self.clock = clock
        self.lock = threading.Lock()    # known and the backoff, shared with the writer thread
        self.known: OrderedDict[int, tuple[int, ...]] = OrderedDict()   # hash -> tokens, in the store
        self.bad: OrderedDict[int, tuple[int, ...]] = OrderedDict()     # hash -> tokens it could not give back
        self.figures = TierFigures()
        self.failures = self.bad_reads = 0
        self.down_until, self.backoff = 0.0, BACKOFF_S
        # the hashes this engine put (or found gone), for the kv_aware router's index of the store
        self.events = KVEventLog()
        self.writer = BlockWriter(self._write, MAX_PENDING_BYTES // self.block_bytes, "kv-store-writer", clock)

    def key(self, block_hash: int) -> str:
        return f"pdserve/{self.namespace}/{block_hash & 0xFFFFFFFFFFFFFFFF:016x}"

    @property
    def available(self) -> bool:
        return self.clock() >= self.down_until

    def _failed(self, what: str, code) -> None:
        with self.lock:
            self.failures += 1
            first = self.available
            self.down_until = self.clock() + self.backoff
            self.backoff = min(self.backoff * 2, MAX_BACKOFF_S)
        if first:
            log.warning("KV store: %s failed (%s); blocks are computed instead, the store is asked again in "
                        "%.0f s", what, code, self.down_until - self.clock())

    def _answered(self) -> None:
        self.backoff = BACKOFF_S

    @staticmethod
    def _remember(entries: OrderedDict, block_hash: int, tokens: tuple[int, ...]) -> None:
        entries[block_hash] = tokens
        entries.move_to_end(block_hash)
        if len(entries) > KNOWN_BLOCKS:
            entries.popitem(last=False)

    # ---- engine thread ---------------------------------------------------------------------------
    def contains(self, block_hash: int, tokens: tuple[int, ...]) -> bool:
        if not self.available or self.bad.get(block_hash) == tokens:
            return False
        if self.known.get(block_hash) == tokens:
            return True
        code = self.client.is_exist(self.key(block_hash))
        if code < 0:
            self._failed("a lookup", code)
            return False
        self._answered()
        if code == 1:
            with self.lock:
                self._remember(self.known, block_hash, tokens)
        return code == 1

    def put(self, block_hash: int, tokens: tuple[int, ...], kv: torch.Tensor) -> None:
        """Copies the block out now and queues its put; drops it when the writer is behind or the
        store is off."""
        with self.lock:
            if self.known.get(block_hash) == tokens or self.clock() < self.down_until:
                return
        self.figures.copied(self.writer.put(block_hash, tokens, kv))

    def get(self, block_hash: int) -> torch.Tensor | None:
        """The block's KV read from the store and checked against the tokens contains() was asked
        with; None when it is not there intact (then it is not asked for again with them)."""
        with self.lock:
            tokens = self.known.get(block_hash)
        if tokens is None or not self.available:
            return None
        start = self.clock()
        data = self.client.get(self.key(block_hash))
        kv = unpack_record(bytearray(data), block_hash, tokens, self.block_shape, self.dtype) if data else None
        self.figures.copied(self.clock() - start)
        with self.lock:
            if kv is None:
                self.bad_reads += 1
                self.known.pop(block_hash, None)
                self._remember(self.bad, block_hash, tokens)
                self.events.removed(block_hash)
            else:
                self._remember(self.known, block_hash, tokens)
        if kv is None:
            log.warning("KV store: block %016x is missing or corrupt; computing it instead",
                        block_hash & 0xFFFFFFFFFFFFFFFF)
        return kv

    def stats(self) -> KVTierStats:
        return self.figures.stats(self.name, len(self.known) * self.block_bytes, self.capacity_bytes)

    def flush(self) -> None:
        """Waits until every queued block is put (or failed): for tests and benchmarks."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    # ---- writer thread ---------------------------------------------------------------------------

    def _write(self, block_hash: int, tokens: tuple[int, ...], kv: torch.Tensor) -> None:
        with self.lock:
            if self.known.get(block_hash) == tokens or self.clock() < self.down_until:
                return
        start = self.clock()
        value = b"".join(record_parts(block_hash, tokens, kv))
        code = self.client.put(self.key(block_hash), value)
        self.figures.copied(self.clock() - start, self.block_bytes if code == 0 else 0)
        with self.lock:
            if code == 0:
                self._remember(self.known, block_hash, tokens)
                self.bad.pop(block_hash, None)
        if code != 0:
            self._failed("a put", code)
        else:
            self._answered()
            self.events.stored(block_hash)


def model_namespace(model_path: str, *layout) -> str:
    """A fingerprint of the model's KV: its config, its weight files (names, sizes, and their first
    and last MiB: two trainings of one shape differ there) and the layout (dtype, block shape...).
    Nodes that load the same files get the same one wherever the files are."""
    digest = hashlib.sha256(repr(layout).encode())
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if not os.path.isfile(path) or not (name == "config.json" or name.endswith((".safetensors", ".bin", ".pt"))):
            continue
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}\n".encode())
        with open(path, "rb") as f:
            digest.update(f.read(2**20))
            if size > 2**21:
                f.seek(-2**20, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:24]


def local_address(endpoint: str) -> str:
    """This host's address on the route to the master (what other clients reach this one at)."""
    host, port = endpoint.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, int(port)))    # UDP: nothing is sent, the kernel only picks the route
        return s.getsockname()[0]


def connect(endpoint: str, segment_bytes: int) -> StoreClient | None:
    """A Mooncake Store client of the master at endpoint (host:port), lending segment_bytes of this
    process's memory to the store; None (logged) when the store cannot be joined."""
    os.environ.setdefault("GLOG_minloglevel", "2")   # Mooncake logs every connection at INFO
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        log.warning("kv_store mooncake needs the mooncake-transfer-engine-non-cuda package (%s); serving "
                    "without the store", exc)
        return None
    client = MooncakeDistributedStore()
    try:
        code = client.setup(local_address(endpoint), "P2PHANDSHAKE", segment_bytes, LOCAL_BUFFER_BYTES, "tcp", "",
                            endpoint)
    except (OSError, ValueError, RuntimeError) as exc:
        code = exc
    if code != 0:
        log.warning("KV store: could not join the Mooncake master at %s (%s); serving without the store",
                    endpoint, code)
        return None
    return client

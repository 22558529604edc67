"""The disk tier under the host tier (or the pool): evicted KV blocks as files, one per block hash.

Each engine writes into a private folder under kv_offload_disk_path (block hashes name token
contents, not the model, so two engines or two runs must never read each other's files); a
folder left by an engine process that died is removed by the next engine that starts there.

A block handed to the tier is copied at once (the pool reuses its memory next) and written by a
writer thread, so no step waits on the disk; it becomes visible to lookups only once its file is
complete. When writes fall behind (more than MAX_PENDING_BYTES queued), new blocks are dropped:
the tier is a cache, a dropped block is a later miss. A file is written whole under a temporary
name, then renamed. Space is bounded in bytes, least recently used files removed first; a failed
write (a full disk, a removed folder) loses that block only.

A read is checked against its header (magic, hash, token ids, length) and a CRC-32 of tokens
and payload; a block that fails, or whose file is gone, is a miss and leaves the index.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from typing import Callable

import torch

from pdserve.engine.kv_offload import KVTierStats, TierFigures

log = logging.getLogger(__name__)

MAGIC = b"PDKV"
HEADER = struct.Struct("<4sqIQI")    # magic, block hash, number of tokens, payload bytes, CRC-32
TOKEN = struct.Struct("<i")
MAX_PENDING_BYTES = 64 * 2**20


class DiskKVTier:
    name = "disk"

    def __init__(self, path: str, capacity_bytes: int, block_shape: torch.Size, dtype: torch.dtype,
                 block_size: int, clock: Callable[[], float] = time.perf_counter):
        self.block_shape, self.dtype, self.block_size = tuple(block_shape), dtype, block_size
        self.block_bytes = math.prod(block_shape) * dtype.itemsize
        self.capacity_bytes = capacity_bytes // self.block_bytes * self.block_bytes
        os.makedirs(path, exist_ok=True)
        _remove_orphans(path)
        self.directory = tempfile.mkdtemp(prefix=f"{_prefix()}{os.getpid()}-", dir=path)
        self.clock = clock
        self.lock = threading.Lock()    # the index, shared with the writer thread
        self.entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()   # hash -> tokens, files written
        self.figures = TierFigures()
        self.write_failures = self.bad_reads = 0
        self.writer = BlockWriter(self._write, MAX_PENDING_BYTES // self.block_bytes, "kv-disk-writer", clock)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True)

    def file(self, block_hash: int) -> str:
        return os.path.join(self.directory, f"{block_hash & 0xFFFFFFFFFFFFFFFF:016x}.kv")

    # ---- engine thread ---------------------------------------------------------------------------
    def contains(self, block_hash: int, tokens: tuple[int, ...]) -> bool:
        return self.entries.get(block_hash) == tokens

    def put(self, block_hash: int, tokens: tuple[int, ...], kv: torch.Tensor) -> None:
        """Copies the block out now and queues its write; drops it when the writer is behind."""
        if self.capacity_bytes == 0:
            return
        with self.lock:
            if self.entries.get(block_hash) == tokens:
                self.entries.move_to_end(block_hash)
                return
        self.figures.copied(self.writer.put(block_hash, tokens, kv))

    def get(self, block_hash: int) -> torch.Tensor | None:
        """The block's KV read back and checked; None (and the entry gone) when it is not intact."""
        with self.lock:
            tokens = self.entries.get(block_hash)
            if tokens is None:
                return None
            self.entries.move_to_end(block_hash)
        start = self.clock()
        kv = self._read(block_hash, tokens)
        self.figures.copied(self.clock() - start)
        if kv is None:
            self.bad_reads += 1
            log.warning("KV disk tier: block %016x is missing or corrupt; computing it instead",
                        block_hash & 0xFFFFFFFFFFFFFFFF)
            with self.lock:
                if self.entries.get(block_hash) == tokens:
                    del self.entries[block_hash]
            _unlink(self.file(block_hash))
        return kv

    def _read(self, block_hash: int, tokens: tuple[int, ...]) -> torch.Tensor | None:
        data = bytearray(record_size(tokens, self.block_bytes) + 1)     # one byte more: a longer file is caught too
        try:
            with open(self.file(block_hash), "rb", buffering=0) as f:
                size = f.readinto(data)
        except OSError:
            return None
        return unpack_record(memoryview(data)[:size], block_hash, tokens, self.block_shape, self.dtype)

    def stats(self) -> KVTierStats:
        return self.figures.stats(self.name, len(self.entries) * self.block_bytes, self.capacity_bytes)

    def close(self) -> None:
        """Stops the writer (after the queued writes) and removes the folder."""
        self.writer.close()
        self._cleanup()

    def flush(self) -> None:
        """Waits until every queued block is written (or failed): for tests and benchmarks."""
        self.writer.flush()

    # ---- writer thread ---------------------------------------------------------------------------
    def _write(self, block_hash: int, tokens: tuple[int, ...], kv: torch.Tensor) -> None:
        with self.lock:
            if self.entries.get(block_hash) == tokens:
                self.entries.move_to_end(block_hash)
                return
            self.entries.pop(block_hash, None)      # a collision: the newer content replaces the file
            victims = []
            while self.entries and (len(self.entries) + 1) * self.block_bytes > self.capacity_bytes:
                victims.append(self.entries.popitem(last=False)[0])
        for victim in victims:
            _unlink(self.file(victim))
        start = self.clock()
        path = self.file(block_hash)
        saved = 0
        try:
            with open(path + ".tmp", "wb") as f:
                for part in record_parts(block_hash, tokens, kv):
                    f.write(part)
            os.replace(path + ".tmp", path)
            saved = self.block_bytes
        except OSError as exc:
            _unlink(path + ".tmp")
            self.write_failures += 1
            if self.write_failures == 1 or self.write_failures % 1000 == 0:
                log.warning("KV disk tier: writing a block to %s failed (%s; %d failures so far); the block "
                            "is not kept", self.directory, exc, self.write_failures)
            return
        finally:
            self.figures.copied(self.clock() - start, saved)
        with self.lock:
            self.entries[block_hash] = tokens


class BlockWriter:
    """A writer thread over a bounded queue of (hash, tokens, KV copy), calling write(*item) for
    each in order (the disk tier's and the store tier's, engine/kv_store.py)."""

    def __init__(self, write: Callable, max_items: int, name: str, clock: Callable[[], float] = time.perf_counter):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, max_items))
        self.clock = clock
        self.dropped = 0          # blocks not queued: the writer was behind (a later miss)
        self.thread = threading.Thread(target=self._loop, args=(write,), name=name, daemon=True)
        self.thread.start()

    def put(self, block_hash: int, tokens: tuple[int, ...], kv: torch.Tensor) -> float:
        """Copies the block out now (the pool reuses its memory next) and queues it, unless the
        writer is behind; returns the seconds the copy took."""
        if self.queue.full():
            self.dropped += 1
            return 0.0
        start = self.clock()
        copy = kv.clone(memory_format=torch.contiguous_format)
        seconds = self.clock() - start
        self.queue.put_nowait((block_hash, tokens, copy))   # only this thread adds: room is left
        return seconds

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> None:
        """Returns after the queued items are written."""
        self.queue.put(None)
        self.thread.join()

    def _loop(self, write: Callable) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                write(*item)
            finally:
                self.queue.task_done()


def _token_bytes(tokens: tuple[int, ...]) -> bytes:
    return struct.pack(f"<{len(tokens)}i", *tokens)


# ---- the block record: the disk tier's file, the store tier's value (engine/kv_store.py) ---------
def record_size(tokens: tuple[int, ...], block_bytes: int) -> int:
    return HEADER.size + TOKEN.size * len(tokens) + block_bytes


def record_parts(block_hash: int, tokens: tuple[int, ...], kv: torch.Tensor) -> tuple:
    """A block's record, in pieces to write one after another: header, token ids, KV bytes."""
    token_bytes, payload = _token_bytes(tokens), kv.reshape(-1).view(torch.uint8).numpy()
    crc = zlib.crc32(payload, zlib.crc32(token_bytes))
    return HEADER.pack(MAGIC, block_hash, len(tokens), payload.nbytes, crc), token_bytes, payload


def unpack_record(data, block_hash: int, tokens: tuple[int, ...], block_shape: tuple,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """The KV of a record (a view of data, a writable buffer) checked against the block it should
    be: its length, header, token ids and CRC-32; None when any of them differs."""
    block_bytes = math.prod(block_shape) * dtype.itemsize
    expected = record_size(tokens, block_bytes)
    if len(data) != expected:
        return None
    magic, stored_hash, num_tokens, payload, crc = HEADER.unpack_from(data)
    body = memoryview(data)[HEADER.size:expected]
    if (magic, stored_hash, num_tokens, payload) != (MAGIC, block_hash, len(tokens), block_bytes):
        return None
    if _token_bytes(tokens) != body[:TOKEN.size * len(tokens)] or zlib.crc32(body) != crc:
        return None
    kv = torch.frombuffer(data, dtype=torch.uint8, offset=expected - block_bytes, count=block_bytes)
    return kv.view(dtype).view(block_shape)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _prefix() -> str:
    return f"pdserve-kv-{socket.gethostname()}-"


def _remove_orphans(path: str) -> None:
    """Removes the folders of this host's engine processes that are gone."""
    pattern = re.compile(re.escape(_prefix()) + r"(\d+)-\w+")
    for name in os.listdir(path):
        match = pattern.fullmatch(name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

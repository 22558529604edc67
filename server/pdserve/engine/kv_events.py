"""The engine's prefix-cache changes, for cache-aware routers (Dynamo's KV events, compacted).

The engine thread records every block hash it stores or evicts; the Stats RPC (another thread)
answers each caller with the net change since the caller's cursor: for every hash touched
since then, whether the cache holds it now. A caller too far behind (the log is bounded) gets
the whole set instead, flagged reset.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class KVEventBatch:
    event_id: int                  # the newest event covered
    reset: bool                    # stored is the whole set; forget what you had
    stored: tuple[int, ...]
    removed: tuple[int, ...]


class KVEventLog:
    def __init__(self, max_events: int = 65536):
        self._lock = threading.Lock()
        self._log: deque[tuple[int, int]] = deque(maxlen=max_events)   # (event id, hash)
        self._held: set[int] = set()
        self._last_id = 1     # 0 is the cursor of a caller that never asked

    def stored(self, block_hash: int) -> None:
        with self._lock:
            self._held.add(block_hash)
            self._append(block_hash)

    def removed(self, block_hash: int) -> None:
        with self._lock:
            self._held.discard(block_hash)
            self._append(block_hash)

    def _append(self, block_hash: int) -> None:
        self._last_id += 1
        self._log.append((self._last_id, block_hash))

    def since(self, after: int) -> KVEventBatch:
        with self._lock:
            last = self._last_id
            if after == last:
                return KVEventBatch(last, False, (), ())
            oldest = self._log[0][0] if self._log else last + 1
            # a cursor of 0, older than the log, or from a former process of this address
            if after == 0 or after + 1 < oldest or after > last:
                return KVEventBatch(last, True, tuple(self._held), ())
            touched = set()
            for event_id, h in reversed(self._log):
                if event_id <= after:
                    break
                touched.add(h)
            held = self._held
            return KVEventBatch(last, False, tuple(h for h in touched if h in held),
                                tuple(h for h in touched if h not in held))

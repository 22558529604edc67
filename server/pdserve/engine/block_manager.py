"""The paged KV pool's bookkeeping: which blocks are free, which belong to which sequences, and
(prefix caching) which full blocks hold reusable KV.

A full block whose KV has been computed is content-addressed by its hash (common/block_hash.py:
its tokens and every token before them). When its last user ends, the block joins the free
queue but keeps its content and its hash: a later prompt that starts with the same tokens takes
it back instead of computing it again. Free blocks are reused least recently freed first, and a
cached block loses its hash only when it is reused (LRU eviction). Reference counts keep a block
shared by several sequences alive until the last one lets it go.

Only blocks wholly inside a prompt's first num_tokens - 1 tokens are ever taken from the cache,
so the block a sequence writes next is always its own: no step ever writes into a shared block.
A block's hash is registered only after its KV is computed (or has arrived from a prefill
engine), so a half-written block, or one written by a failed handoff, is never shared.

With offload tiers (kv_offload.py), a cached block's KV is handed to them when the block is
reused, and a prompt's prefix may continue in the tiers where the pool's ends: those blocks get
fresh pool blocks, their KV is copied back at once, and they count as cached from then on. A
block a tier cannot give back (a corrupt file) ends the prefix there: it is computed.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from pdserve.engine.kv_events import KVEventLog
from pdserve.engine.sequence import Sequence


class OffloadTier(Protocol):
    """What the block manager asks of the tiers below the pool (kv_offload.KVTiers)."""
    def contains(self, block_hash: int, tokens: tuple[int, ...]) -> bool: ...
    def save(self, block: int, block_hash: int, tokens: tuple[int, ...]) -> None: ...
    def computed(self, block: int, block_hash: int, tokens: tuple[int, ...]) -> None: ...   # KV just cached
    def fetch(self, blocks: list[tuple[int, tuple[int, ...]]]): ...   # (hash, tokens): KV of a prefix of them
    def restore(self, staged, blocks: list[int]) -> None: ...


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 events: KVEventLog | None = None, tier: OffloadTier | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.events = events
        self.tier = tier if enable_prefix_caching else None
        self.ref_counts = [0] * num_blocks
        # Blocks nobody uses, in the order they are reused (oldest first); cached ones keep their hash.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}                       # block hash -> block id
        self.block_hash: dict[int, int] = {}                   # block id -> its hash (cached blocks)
        self.block_tokens: dict[int, tuple[int, ...]] = {}     # block id -> its tokens (checked on a hit)
        # Prefix-cache figures: prompt tokens looked up, and those found in the cache.
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    # ---- admission -------------------------------------------------------------------------------
    def _prefix_blocks(self, seq: Sequence):
        """(hash, tokens) of the sequence's full blocks that may be taken from a cache, in order
        (never its last token), hashed as they are asked for."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:   # those are computed here
            return
        tokens, bs = seq.all_token_ids, self.block_size
        parent = None
        for i in range((len(tokens) - 1) // bs):
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            parent = seq.block_hash(i, parent, block_tokens)
            yield parent, block_tokens

    def cached_prefix(self, seq: Sequence) -> list[tuple[int, tuple[int, ...], int | None]]:
        """(hash, tokens, pool block or None where the tier holds it) of the longest prefix of the
        sequence's blocks cached in the pool or the tier, block by block."""
        found = []
        for block_hash, block_tokens in self._prefix_blocks(seq):
            block = self.cached.get(block_hash)
            if block is not None and self.block_tokens[block] == block_tokens:
                found.append((block_hash, block_tokens, block))
            elif self.tier is not None and self.tier.contains(block_hash, block_tokens):
                found.append((block_hash, block_tokens, None))
            else:
                break
        return found

    def allocate(self, seq: Sequence) -> bool:
        """Gives a waiting sequence the blocks for all its tokens (prompt and any output to
        recompute), reusing its cached prefix; False (nothing taken) when the pool lacks room."""
        assert not seq.block_table, "sequence already holds blocks"
        found = self.cached_prefix(seq)
        hits = [b for _, _, b in found if b is not None]
        free_hits = sum(1 for b in hits if self.ref_counts[b] == 0)
        fresh = blocks_needed(seq.num_tokens, self.block_size) - len(hits)
        if fresh > self.num_free_blocks - free_hits:
            return False
        loads = [(h, t) for h, t, b in found if b is None]
        staged = self.tier.fetch(loads) if loads else None
        if loads and len(staged) < len(loads):   # a tier lost a block (and forgot it): the prefix ends there
            return self.allocate(seq)
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
        fresh_blocks = [self._take_free_block() for _ in range(fresh)]
        if loads:
            self.tier.restore(staged, fresh_blocks[:len(loads)])
            for block, (block_hash, block_tokens) in zip(fresh_blocks, loads):
                self._register(block, block_hash, block_tokens)
        table, rest = [], iter(fresh_blocks)
        for _, _, block in found:
            table.append(block if block is not None else next(rest))
        seq.block_table = table + list(rest)
        seq.block_hashes = [h for h, _, _ in found]
        seq.num_cached_tokens = len(found) * self.block_size
        self.query_tokens += seq.num_tokens
        self.hit_tokens += len(hits) * self.block_size
        return True

    def _take_free_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        self._evict(block)
        self.ref_counts[block] = 1
        return block

    def _evict(self, block: int) -> None:
        block_hash = self.block_hash.pop(block, None)
        if block_hash is None:
            return
        block_tokens = self.block_tokens.pop(block)
        if self.tier is not None:
            self.tier.save(block, block_hash, block_tokens)
        if self.cached.get(block_hash) == block:
            del self.cached[block_hash]
            if self.events is not None:
                self.events.removed(block_hash)

    # ---- decoding ----------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's next token has a slot (a new block only at a block boundary)."""
        needs_block = seq.num_tokens > len(seq.block_table) * self.block_size
        return not needs_block or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        if seq.num_tokens > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_free_block())

    def commit(self, seq: Sequence) -> None:
        """Registers the sequence's blocks that became full of computed KV, so others can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_cached_tokens // bs, len(seq.block_table))
        if len(seq.block_hashes) >= full:
            return
        tokens = seq.all_token_ids
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            block_hash = seq.block_hash(i, seq.block_hashes[-1] if seq.block_hashes else None, block_tokens)
            seq.block_hashes.append(block_hash)
            block = seq.block_table[i]
            if block_hash in self.cached or block in self.block_hash:
                continue   # the same content is cached in another block already: this one stays private
            self._register(block, block_hash, block_tokens)

    def _register(self, block: int, block_hash: int, block_tokens: tuple[int, ...]) -> None:
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        self.block_tokens[block] = block_tokens
        if self.events is not None:
            self.events.stored(block_hash)
        if self.tier is not None:
            self.tier.computed(block, block_hash, block_tokens)

    # ---- release -----------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Lets the sequence's blocks go. A block nobody else uses joins the free queue: a cached
        one at the back (reused last; the sequence's tail before its head), others at the front."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if block not in self.block_hash:
                    self.free_queue.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_cached_tokens = 0

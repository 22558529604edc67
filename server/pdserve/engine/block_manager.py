"""The paged KV pool's bookkeeping: which blocks are free, which belong to which sequence."""
from __future__ import annotations

from collections import deque

from pdserve.engine.sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def can_allocate(self, seq: Sequence) -> bool:
        return blocks_needed(seq.num_tokens, self.block_size) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Gives a waiting sequence the blocks for all its tokens (prompt and any recomputed output)."""
        assert not seq.block_table, "sequence already holds blocks"
        for _ in range(blocks_needed(seq.num_tokens, self.block_size)):
            seq.block_table.append(self.free_blocks.popleft())

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's next token has a slot (a new block only at a block boundary)."""
        needs_block = seq.num_tokens > len(seq.block_table) * self.block_size
        return not needs_block or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        if seq.num_tokens > len(seq.block_table) * self.block_size:
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_cached_tokens = 0

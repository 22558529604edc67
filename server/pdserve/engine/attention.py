"""Attention over the paged KV cache: the metadata a step carries, and the one entry point the
model calls. The work itself is done by the device's kernel set (engine/kernels/).

The KV pool is one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]:
block-major, so one block of one sequence, all layers, K and V, is a single contiguous
region that a KV transport can write in one transfer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_blocks: torch.Tensor          # [tokens] block of each new token's KV slot
    slot_offsets: torch.Tensor         # [tokens] offset inside that block
    last_token_indices: torch.Tensor   # [seqs] index of each sequence's last new token
    # prefill: the boundaries of each sequence's new tokens in the flat batch, how many of its
    # tokens were already in the cache before them, and (where that is not 0) its block table
    prefill_bounds: list[tuple[int, int]] | None = None
    prefill_cached: list[int] | None = None
    prefill_block_tables: list[torch.Tensor | None] | None = None
    # decode: per-sequence block tables (padded) and context lengths
    block_tables: torch.Tensor | None = None   # [seqs, max_blocks] int64
    context_lens: torch.Tensor | None = None   # [seqs] int64


def paged_attention(kernels, q, k, v, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata) -> torch.Tensor:
    """q [tokens, heads, dim]; k, v [tokens, kv_heads, dim]. Stores k, v in the cache, then attends."""
    kernels.store_kv(kv_cache, layer, k, v, meta)
    if meta.is_prefill:
        return kernels.prefill_attention(q, k, v, kv_cache, layer, meta)
    return kernels.decode_attention(q, kv_cache, layer, meta)

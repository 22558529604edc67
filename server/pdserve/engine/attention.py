"""Attention over the paged KV cache: the metadata a step carries, and the one entry point the
model calls. The work itself is done by the device's kernel set (engine/kernels/).

The KV pool is one tensor seen as [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
and stored layer-major (model_runner.py): one layer of a run of consecutive blocks is a single
contiguous region, which a KV transport writes in one transfer as soon as that layer is computed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


class Progress:
    """When a forward last finished a layer (time.monotonic()): a step that computes a long prompt
    shows it is moving, layer by layer, to the stall watchdog (engine/worker.py)."""
    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = 0.0


@dataclass
class AttentionMetadata:
    """One step's batch: first the prompt pieces (prefill part), then one token per decoding
    sequence (decode part). A step may hold either part or both (chunked prefill)."""
    slot_blocks: torch.Tensor          # [tokens] block of each new token's KV slot
    slot_offsets: torch.Tensor         # [tokens] offset inside that block
    last_token_indices: torch.Tensor   # [sampled seqs] index of each sampled sequence's last new token
    # prefill part: the boundaries of each piece in the flat batch, how many of its sequence's
    # tokens were already in the cache before it, and (where that is not 0) its block table
    prefill_bounds: list[tuple[int, int]] | None = None
    prefill_cached: list[int] | None = None
    prefill_block_tables: list[torch.Tensor | None] | None = None
    # decode part: per-sequence block tables (padded) and context lengths
    block_tables: torch.Tensor | None = None   # [seqs, max_blocks] int64
    context_lens: torch.Tensor | None = None   # [seqs] int64
    # the device kernel's plan of the decode part's attention, made on the host before the
    # forward (kernels.paged_decode: FlashInfer's wrapper); None: the kernel set reads block_tables
    decode_plan: object | None = None
    # called with each layer's index once its KV is in the pool (a PREFILL engine pushes it out)
    after_layer: Callable[[int], None] | None = None
    progress: Progress | None = None   # stamped after each layer (rank 0 only)

    def layer_done(self, layer: int) -> None:
        """The model calls this after each layer."""
        if self.progress is not None:
            self.progress.at = time.monotonic()
        if self.after_layer is not None:
            self.after_layer(layer)

    @property
    def num_prefill_tokens(self) -> int:
        return self.prefill_bounds[-1][1] if self.prefill_bounds else 0


def paged_attention(kernels, q, k, v, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata) -> torch.Tensor:
    """q [tokens, heads, dim]; k, v [tokens, kv_heads, dim]. Stores k, v in the cache, then attends."""
    kernels.store_kv(kv_cache, layer, k, v, meta)
    if meta.block_tables is None:
        return kernels.prefill_attention(q, k, v, kv_cache, layer, meta)
    if not meta.prefill_bounds:
        return kernels.decode_attention(q, kv_cache, layer, meta)
    p = meta.num_prefill_tokens
    return torch.cat((kernels.prefill_attention(q[:p], k[:p], v[:p], kv_cache, layer, meta),
                      kernels.decode_attention(q[p:], kv_cache, layer, meta)))

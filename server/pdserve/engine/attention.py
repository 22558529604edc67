"""Attention over the paged KV cache, in plain torch so it runs on cpu, cuda and npu.

The KV pool is one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]:
block-major, so one block of one sequence, all layers, K and V, is a single contiguous
region that a KV transport can write in one transfer. A device kernel (torch_npu's fused
attention, flash attention) would replace paged_attention() behind the same signature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_blocks: torch.Tensor          # [tokens] block of each new token's KV slot
    slot_offsets: torch.Tensor         # [tokens] offset inside that block
    last_token_indices: torch.Tensor   # [seqs] index of each sequence's last new token
    # prefill: the boundaries of each sequence's new tokens in the flat batch
    prefill_bounds: list[tuple[int, int]] | None = None
    # decode: per-sequence block tables (padded) and context lengths
    block_tables: torch.Tensor | None = None   # [seqs, max_blocks]
    context_lens: torch.Tensor | None = None   # [seqs]
    context_mask: torch.Tensor | None = None   # [seqs, 1, 1, max_blocks * block_size]


def paged_attention(q, k, v, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata) -> torch.Tensor:
    """q [tokens, heads, dim]; k, v [tokens, kv_heads, dim]. Stores k, v in the cache."""
    kv_cache[meta.slot_blocks, layer, 0, meta.slot_offsets] = k
    kv_cache[meta.slot_blocks, layer, 1, meta.slot_offsets] = v
    if meta.is_prefill:
        return _prefill_attention(q, k, v, meta)
    return _decode_attention(q, kv_cache, layer, meta)


def _prefill_attention(q, k, v, meta: AttentionMetadata) -> torch.Tensor:
    # Prompts are computed whole (no prefix cache), so attention needs only the new tokens.
    out = torch.empty_like(q)
    for start, end in meta.prefill_bounds:
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1)
        vs = v[start:end].transpose(0, 1)
        out[start:end] = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, enable_gqa=True).transpose(0, 1)
    return out


def _decode_attention(q, kv_cache, layer: int, meta: AttentionMetadata) -> torch.Tensor:
    seqs, max_blocks = meta.block_tables.shape
    _, _, _, block_size, kv_heads, dim = kv_cache.shape
    blocks = meta.block_tables.reshape(-1)
    # Gathering K and V separately yields contiguous [seqs * max_blocks, block_size, kv_heads, dim]
    # tensors that view as [seqs, context, kv_heads, dim] with no further copy.
    keys = kv_cache[:, layer, 0].index_select(0, blocks).view(seqs, max_blocks * block_size, kv_heads, dim)
    values = kv_cache[:, layer, 1].index_select(0, blocks).view(seqs, max_blocks * block_size, kv_heads, dim)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=meta.context_mask, enable_gqa=True)
    return out.squeeze(2)

"""Multi-head latent attention (DeepSeek-V2/V3) over a paged pool of compressed latents.

The pool keeps, per token and layer, one row of kv_lora_rank + qk_rope_head_dim values: the
normed KV latent c and the shared rotary key k_pe, not per-head keys and values (MLA's point:
a V3 layer's row is 576 values where its full K and V would be 128 heads x 320). The model
gives the pool's shape (kv_block_shape); ModelRunner allocates it layer-major like any pool,
[layers, blocks, block_size, row] seen as [blocks, layers, block_size, row], so one layer of a
run of blocks is one contiguous region and the PD transport and the host tier move it as they
move full K/V.

- Prefill up-projects the context's latents to per-head keys and values (kv_b_proj) and runs
  SDPA: for a long piece that is cheaper than scoring every query against the latent.
- Decode uses the absorbed weights: with kv_b_proj = [W_UK; W_UV] per head, q_nope . (W_UK c)
  = (W_UK^T q_nope) . c, so each query is moved into latent space once and scored against the
  pool's rows as they are (one shared "head" of kv_lora_rank + rope values, MQA-like), and the
  attention's latent output goes through W_UV at the end. No token's keys or values are ever
  materialised per head on the decode path.

Both run in torch on any device; the kernel set's paged kernels assume per-head K/V rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttentionMetadata


def store_latent(kv_cache: torch.Tensor, layer: int, rows: torch.Tensor, meta: AttentionMetadata) -> None:
    """rows [T, kv_lora_rank + rope] into the new tokens' slots."""
    kv_cache[meta.slot_blocks, layer, meta.slot_offsets] = rows


def gather_latent(kv_cache: torch.Tensor, layer: int, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` rows, [length, kv_lora_rank + rope] (a copy)."""
    block_size = kv_cache.shape[2]
    n = -(-length // block_size)
    return kv_cache[block_table[:n], layer].reshape(n * block_size, -1)[:length]


def prefill_mla(q: torch.Tensor, latent: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata,
                up, rank: int, v_dim: int, scale: float) -> torch.Tensor:
    """q [T, H, nope + rope] (rotary applied); latent [T, rank + rope], the new tokens' rows
    (already stored); up: kv_b_proj, rank -> H * (nope + v). Returns [T, H, v] for the prefill part."""
    heads, qk_dim = q.shape[1], q.shape[2]
    nope = qk_dim - (latent.shape[1] - rank)
    out = q.new_empty((meta.num_prefill_tokens, heads, v_dim))
    for i, (start, end) in enumerate(meta.prefill_bounds):
        cached = meta.prefill_cached[i] if meta.prefill_cached else 0
        total = cached + end - start
        rows = gather_latent(kv_cache, layer, meta.prefill_block_tables[i], total) if cached else latent[start:end]
        kv = up(rows[:, :rank]).view(total, heads, nope + v_dim)
        keys = torch.cat((kv[..., :nope], rows[:, None, rank:].expand(total, heads, qk_dim - nope)), dim=-1)
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[start:end], keys, kv[..., nope:]))
        if cached == 0:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:   # query j (position cached + j) sees keys 0 .. cached + j
            qpos = torch.arange(cached, total, device=q.device)[:, None]
            mask = torch.arange(total, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def decode_mla(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata,
               w_uk: torch.Tensor, w_uv_t: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per sequence, absorbed: q_nope [S, H, nope], q_pe [S, H, rope] (rotated),
    w_uk [H, nope, rank], w_uv_t [H, rank, v]. Returns [S, H, v]."""
    seqs, max_blocks = meta.block_tables.shape
    rank = w_uk.shape[2]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)                             # [H, S, rank]
    query = torch.cat((q_latent, q_pe.transpose(0, 1)), dim=-1).transpose(0, 1)    # [S, H, rank + rope]
    rows = kv_cache[:, layer].index_select(0, meta.block_tables.reshape(-1))
    rows = rows.view(seqs, max_blocks * kv_cache.shape[2], -1)                     # [S, span, rank + rope]
    pad = torch.arange(rows.shape[1], device=q_nope.device)[None, :] >= meta.context_lens[:, None]
    # slots past a sequence's end may never have been written (the pool is torch.empty): a NaN
    # there would survive a zero probability, so the gathered copy's padding is zeroed
    rows.masked_fill_(pad[:, :, None], 0.0)
    scores = torch.matmul(query, rows.transpose(1, 2)) * scale                     # [S, H, span]
    scores.masked_fill_(pad[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)
    out_latent = torch.matmul(probs, rows[..., :rank])                              # [S, H, rank]
    return torch.bmm(out_latent.transpose(0, 1), w_uv_t).transpose(0, 1)           # [S, H, v]

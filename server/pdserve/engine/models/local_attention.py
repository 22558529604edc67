"""Attention the shared paged kernels do not compute: sliding windows, logit soft-capping and a
query scale other than head_dim ** -0.5 (Gemma 2/3, Phi-3, Mixtral and Qwen-MoE configs with
a window).

The device kernels (engine/kernels/) attend over the whole causal context with the standard
scale; a layer that needs only another scale runs on them with its queries rescaled. A layer
with a window or soft-capping runs this plain-torch path instead, written like transformers'
eager attention (scores in the model dtype, capped, masked, softmax in float32): its keys and
values still live in the shared paged pool (stored through the kernel set), and the window is
a mask over them: the pool keeps every token of such a layer, not only the window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttentionMetadata, paged_attention
from pdserve.engine.models.llama import Attention


@dataclass(frozen=True)
class AttentionShape:
    """What sets one layer's attention apart from the kernels' default."""
    scale: float                   # multiplies q.k
    window: int | None = None      # a key is seen while query position - key position < window
    softcap: float | None = None   # scores become softcap * tanh(scores / softcap)


def sliding_windows(config) -> list[int | None]:
    """Each layer's window, the way transformers applies config.sliding_window: to the layers
    layer_types marks "sliding_attention" where the config has layer_types, else to every layer."""
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in layer_types[:config.num_hidden_layers]]


def _attend(q, keys, values, mask, shape: AttentionShape) -> torch.Tensor:
    """q [B, n, H, D]; keys, values [B, m, KVH, D]; mask [B, n, m] (True: seen). Returns [B, n, H, D]."""
    b, n, heads, dim = q.shape
    kv_heads = keys.shape[2]
    qg = q.view(b, n, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4)     # [B, KVH, G, n, D]
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)[:, :, None]) * shape.scale  # [B, KVH, G, n, m]
    if shape.softcap is not None:
        scores = torch.tanh(scores / shape.softcap) * shape.softcap
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, values.transpose(1, 2)[:, :, None])                    # [B, KVH, G, n, D]
    return out.permute(0, 3, 1, 2, 4).reshape(b, n, heads, dim)


def _visible(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """qpos [..., n, 1], kpos [..., 1, m]: causal, and inside the window where there is one."""
    seen = kpos <= qpos
    return seen if window is None else seen & (kpos > qpos - window)


def torch_paged_attention(kernels, q, k, v, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata,
                          shape: AttentionShape) -> torch.Tensor:
    """paged_attention's contract (stores k, v, then attends) with a window and soft-capping."""
    kernels.store_kv(kv_cache, layer, k, v, meta)
    out = torch.empty_like(q)
    device = q.device
    for i, (start, end) in enumerate(meta.prefill_bounds or ()):
        cached = meta.prefill_cached[i] if meta.prefill_cached else 0
        total = cached + end - start
        if cached:
            keys, values = kernels.gather_context(kv_cache, layer, meta.prefill_block_tables[i], total)
        else:
            keys, values = k[start:end], v[start:end]
        qpos = torch.arange(cached, total, device=device)[:, None]
        mask = _visible(qpos, torch.arange(total, device=device)[None, :], shape.window)
        out[start:end] = _attend(q[None, start:end], keys[None], values[None], mask[None], shape)[0]
    if meta.block_tables is not None:
        p = meta.num_prefill_tokens
        seqs, max_blocks = meta.block_tables.shape
        _, _, _, block_size, kv_heads, dim = kv_cache.shape
        blocks = meta.block_tables.reshape(-1)
        span = max_blocks * block_size
        keys = kv_cache[:, layer, 0].index_select(0, blocks).view(seqs, span, kv_heads, dim)
        values = kv_cache[:, layer, 1].index_select(0, blocks).view(seqs, span, kv_heads, dim)
        # slots past a sequence's end may never have been written (the pool is torch.empty): a
        # NaN value there would survive its zero probability, so the gathered copy's are zeroed
        past_end = torch.arange(span, device=device)[None, :] >= meta.context_lens[:, None]
        values.masked_fill_(past_end[:, :, None, None], 0.0)
        qpos = (meta.context_lens - 1)[:, None, None]
        mask = _visible(qpos, torch.arange(span, device=device)[None, None, :], shape.window)
        out[p:] = _attend(q[p:, None], keys, values, mask, shape)[:, 0]
    return out


class ShapedAttention(Attention):
    """Llama's attention (fused QKV, optional q/k norms, rotary) with this layer's AttentionShape:
    on the device kernels where only the scale differs, on torch_paged_attention otherwise."""

    def __init__(self, config, layer_idx: int, qkv_bias: bool, qk_norm: bool, shape: AttentionShape):
        super().__init__(config, layer_idx, qkv_bias, qk_norm)
        self.shape = shape
        # the kernels scale by head_dim ** -0.5: queries are rescaled to the layer's own scale
        self.q_factor = shape.scale * self.head_dim ** 0.5

    def attend(self, kernels, q, k, v, kv_cache, meta: AttentionMetadata):
        if self.shape.window is not None or self.shape.softcap is not None:
            return torch_paged_attention(kernels, q, k, v, kv_cache, self.layer_idx, meta, self.shape)
        if self.q_factor != 1.0:
            q = q * self.q_factor
        return paged_attention(kernels, q, k, v, kv_cache, self.layer_idx, meta)


def window_layers(layers, config, qkv_bias: bool, qk_norm: bool) -> None:
    """Gives every layer of a Llama-style model that config.sliding_window covers a windowed
    attention (the checkpoint's names and the layer's scale unchanged)."""
    for i, (layer, window) in enumerate(zip(layers, sliding_windows(config))):
        if window is not None:
            scale = layer.self_attn.head_dim ** -0.5
            layer.self_attn = ShapedAttention(config, i, qkv_bias, qk_norm, AttentionShape(scale=scale, window=window))

"""The plain-torch kernels: run on every device, and are what the fast kernels are tested against.

A kernel set is the handful of operations the model's layer body is made of. The model never
calls torch for these directly, so each device (kernels/cpu.py, cuda.py, npu.py) can swap in its
fast path behind the same methods, and tests compare every fast method against this class.

Shapes: tokens T, query heads H, KV heads KVH, head size D. The KV pool is seen as
[num_blocks, num_layers, 2, block_size, KVH, D] and stored layer-major (model_runner.py):
kernels index it through its strides, never assuming it is contiguous.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pdserve.engine.quantization import QuantizedWeight

if TYPE_CHECKING:
    from pdserve.engine.attention import AttentionMetadata


class Linear:
    """A linear layer's weights, prepared once at load for the kernel set that runs it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SiluGateUp:
    """An MLP's gate_up linear followed by SiLU-and-mul (TorchKernels.silu_gate_up)."""

    def __init__(self, linear: Linear, silu_and_mul):
        self.linear, self.silu_and_mul = linear, silu_and_mul
        self.in_features, self.out_features = linear.in_features, linear.out_features // 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.silu_and_mul(self.linear(x))


class BlockGather:
    """Gathers one layer's K and V blocks of a decode batch into buffers reused across steps
    (a fresh multi-MB tensor per step costs more than the copy): keys and values come back as
    [seqs, span, kv_heads, dim], span = the longest block table times the block size."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(max(n, 1), dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:n].view(shape)

    def __call__(self, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor, context_lens: torch.Tensor):
        seqs, max_blocks = block_tables.shape
        _, _, _, block_size, kv_heads, dim = kv_cache.shape
        blocks = block_tables.reshape(-1)
        keys = self._buffer("k", (seqs * max_blocks, block_size, kv_heads, dim), kv_cache.dtype)
        values = self._buffer("v", (seqs * max_blocks, block_size, kv_heads, dim), kv_cache.dtype)
        torch.index_select(kv_cache[:, layer, 0], 0, blocks, out=keys)
        torch.index_select(kv_cache[:, layer, 1], 0, blocks, out=values)
        span = max_blocks * block_size
        return zero_padding(keys.view(seqs, span, kv_heads, dim), values.view(seqs, span, kv_heads, dim), context_lens)


def zero_padding(keys: torch.Tensor, values: torch.Tensor, context_lens: torch.Tensor):
    """Zeroes the gathered slots past each sequence's context, in place. Slots never written hold
    whatever the pool's memory held (NaN included), and a masked-out NaN still poisons the output
    (0 x NaN), so masking the scores alone is not enough."""
    span = keys.shape[1]
    pad = (torch.arange(span, device=keys.device)[None, :] >= context_lens[:, None])[:, :, None, None]
    return keys.masked_fill_(pad, 0), values.masked_fill_(pad, 0)


def first_max_indices(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens: each row's first largest logit. max(dim).indices, not argmax: on CPU,
    argmax over bfloat16 is the slower kernel of the two (bench/RESULTS.md)."""
    return logits.max(dim=-1).indices


class TorchKernels:
    name = "torch"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def step_threads(self, decode_rows: int):
        """A context around one forward, which holds decode_rows decoding sequences and no prompt
        piece where that is not 0: a device's kernel set may keep its threads ready for it."""
        return contextlib.nullcontext()

    # ---- linears and the layer body -------------------------------------------------------
    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        """The linear of a weight prepared at load; a QuantizedWeight (engine/quantization.py)
        gets a quantized linear (quantized_linear)."""
        if isinstance(weight, QuantizedWeight):
            return self.quantized_linear(weight, bias)
        return Linear(weight, bias)

    def quantized_linear(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> Linear:
        """Weights with 16-bit activations run dense, dequantized; quantized activations run the
        reference (kernels/quant.py). Device kernel sets override this with their fast GEMMs."""
        if weight.activations == "none":
            return self.linear(weight.dequantize(self.dtype), bias)
        from pdserve.engine.kernels.quant import FakeQuantLinear
        return FakeQuantLinear(weight, bias)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return first_max_indices(logits)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Computed in float32 like transformers, so low-precision outputs match it.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """Returns (rms_norm(x + residual), x + residual): the residual stream and its norm."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D]; cos, sin [T, 1, D]. Returns the rotated x (rotate-half convention)."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        half = gate_up.shape[-1] // 2
        return F.silu(gate_up[..., :half]) * gate_up[..., half:]

    def silu_gate_up(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "SiluGateUp":
        """An MLP's gate_up linear (weight: the gate rows, then the up rows) with SiLU-and-mul
        after it: x -> silu(x gate^T) * (x up^T). Here the linear, then silu_and_mul; a kernel
        set may fuse them."""
        return SiluGateUp(self.linear(weight, bias), self.silu_and_mul)

    # ---- the paged KV cache -----------------------------------------------------------------
    def store_kv(self, kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                 meta: "AttentionMetadata") -> None:
        kv_cache[meta.slot_blocks, layer, 0, meta.slot_offsets] = k
        kv_cache[meta.slot_blocks, layer, 1, meta.slot_offsets] = v

    def gather_context(self, kv_cache: torch.Tensor, layer: int, block_table: torch.Tensor, length: int):
        """One sequence's first `length` keys and values, [length, KVH, D] each (a copy)."""
        block_size = kv_cache.shape[3]
        n = (length + block_size - 1) // block_size
        blocks = kv_cache[block_table[:n], layer]          # [n, 2, block_size, KVH, D]
        keys = blocks[:, 0].reshape(n * block_size, *blocks.shape[-2:])[:length]
        values = blocks[:, 1].reshape(n * block_size, *blocks.shape[-2:])[:length]
        return keys, values

    def prefill_attention(self, q, k, v, kv_cache: torch.Tensor, layer: int, meta: "AttentionMetadata"):
        """q [T, H, D], k, v [T, KVH, D] (the new tokens, already stored). Causal attention of each
        sequence's new tokens over its whole context: the new tokens and, where a prefix was
        already cached (prefix cache, chunked prefill), the cached ones read from the pool."""
        out = torch.empty_like(q)
        bounds = meta.prefill_bounds
        cached_of = meta.prefill_cached or [0] * len(bounds)
        i = 0
        while i < len(bounds):
            start, end = bounds[i]
            if cached_of[i] == 0:
                # a run of whole prompts of one length, side by side in the batch: one SDPA call
                # with a batch dimension (a call per prompt costs more than the attention of a
                # few hundred tokens)
                n, j = end - start, i + 1
                while j < len(bounds) and cached_of[j] == 0 and bounds[j] == (bounds[j - 1][1], bounds[j - 1][1] + n):
                    j += 1
                rows = slice(start, start + (j - i) * n)
                # [prompts, heads, n, D]: 4-D, the fast SDPA path
                qs, ks, vs = (t[rows].view(j - i, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                out[rows] = o.transpose(1, 2).reshape(-1, *q.shape[1:])
                i = j
                continue
            cached, total = cached_of[i], cached_of[i] + (end - start)
            keys, values = self.gather_context(kv_cache, layer, meta.prefill_block_tables[i], total)
            qs = q[start:end].transpose(0, 1).unsqueeze(0)
            ks = keys.transpose(0, 1).unsqueeze(0)
            vs = values.transpose(0, 1).unsqueeze(0)
            # query j (position cached + j) sees keys 0 .. cached + j
            qpos = torch.arange(cached, total, device=q.device)[:, None]
            mask = torch.arange(total, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            out[start:end] = o.squeeze(0).transpose(0, 1)
            i += 1
        return out

    def paged_decode(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, max_blocks: int):
        """A decode attention kernel planned on the host once per step (FlashInfer's on GPUs):
        an object whose plan(block_lists, context_lens, graph_size=None) returns what
        meta.decode_plan carries to decode_attention. None here: decode_attention reads the
        block tables itself. max_blocks: the widest block table a step can hold."""
        return None

    def decode_attention(self, q, kv_cache: torch.Tensor, layer: int, meta: "AttentionMetadata"):
        """q [seqs, H, D], one new token per sequence: attention over its whole context in the pool.
        The reference gathers every sequence's blocks (padded to the longest) and masks the tail."""
        seqs, max_blocks = meta.block_tables.shape
        _, _, _, block_size, kv_heads, dim = kv_cache.shape
        blocks = meta.block_tables.reshape(-1)
        keys, values = zero_padding(
            kv_cache[:, layer, 0].index_select(0, blocks).view(seqs, max_blocks * block_size, kv_heads, dim),
            kv_cache[:, layer, 1].index_select(0, blocks).view(seqs, max_blocks * block_size, kv_heads, dim),
            meta.context_lens)
        span = torch.arange(max_blocks * block_size, device=q.device)
        mask = (span[None, :] < meta.context_lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=True)
        return out.squeeze(2)

    # ---- bookkeeping ------------------------------------------------------------------------
    def describe(self) -> str:
        return f"{self.name} kernels ({self.dtype})"

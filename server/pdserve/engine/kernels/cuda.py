"""CUDA kernels: cuBLAS linears (F.linear), SDPA for prefill (4-D: flash / memory-efficient
kernels), and decode attention over the block tables through SDPA on blocks gathered into
buffers reused across steps (no fresh allocation per step and layer).

torch has no paged-attention kernel of its own; the gather is a device-memory copy at HBM
bandwidth, small next to the linears at the batch sizes pdserve runs. A flash-attn or
FlashInfer paged kernel would plug in here behind decode_attention().
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.kernels.reference import TorchKernels


class CudaKernels(TorchKernels):
    name = "cuda"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)
        self._buffers: dict[str, torch.Tensor] = {}

    def describe(self) -> str:
        return f"cuda kernels ({self.dtype}): cuBLAS linears, SDPA prefill, SDPA decode over reused gather buffers"

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(max(n, 1), dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:n].view(shape)

    def decode_attention(self, q, kv_cache: torch.Tensor, layer: int, meta):
        seqs, max_blocks = meta.block_tables.shape
        _, _, _, block_size, kv_heads, dim = kv_cache.shape
        span = max_blocks * block_size
        blocks = meta.block_tables.reshape(-1)
        keys = self._buffer("k", (seqs * max_blocks, block_size, kv_heads, dim), kv_cache.dtype)
        values = self._buffer("v", (seqs * max_blocks, block_size, kv_heads, dim), kv_cache.dtype)
        torch.index_select(kv_cache[:, layer, 0], 0, blocks, out=keys)
        torch.index_select(kv_cache[:, layer, 1], 0, blocks, out=values)
        keys = keys.view(seqs, span, kv_heads, dim).transpose(1, 2)
        values = values.view(seqs, span, kv_heads, dim).transpose(1, 2)
        mask = (torch.arange(span, device=q.device)[None, :] < meta.context_lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=True)
        return out.squeeze(2)

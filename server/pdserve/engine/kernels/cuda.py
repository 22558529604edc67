"""CUDA kernels: cuBLAS linears (F.linear), SDPA for prefill (4-D: flash / memory-efficient
kernels; not cuDNN's, which builds a plan per shape), and decode attention over the block
tables through SDPA on blocks gathered into buffers reused across steps (no fresh allocation
per step and layer).

torch has no paged-attention kernel of its own; the gather is a device-memory copy at HBM
bandwidth, small next to the linears at the batch sizes pdserve runs. A flash-attn or
FlashInfer paged kernel would plug in here behind decode_attention().
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.kernels import quant
from pdserve.engine.kernels.reference import BlockGather, Linear, TorchKernels
from pdserve.engine.quantization import QuantizedWeight


class CudaKernels(TorchKernels):
    name = "cuda"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)
        self.gather = BlockGather(device)
        # SDPA's cuDNN backend (picked for half precision on Hopper) builds an execution plan
        # for every new shape, and prompt pieces come in many shapes, so a cold round spends most
        # of its prefill building plans. Flash and the memory-efficient kernel need no per-shape
        # build. The engine is its own process.
        torch.backends.cuda.enable_cudnn_sdp(False)

    def describe(self) -> str:
        return f"cuda kernels ({self.dtype}): cuBLAS linears, SDPA prefill, SDPA decode over reused gather buffers"

    def quantized_linear(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> Linear:
        """int8 activations on the int8 tensor cores (torch._int_mm), fp8 on sm89+ (torch._scaled_mm)."""
        fast = {"int8": quant.IntMmLinear, "fp8": quant.ScaledMmLinear}.get(weight.activations)
        if fast is not None:
            return quant.checked(fast, weight, bias)
        return super().quantized_linear(weight, bias)

    def decode_attention(self, q, kv_cache: torch.Tensor, layer: int, meta):
        keys, values = self.gather(kv_cache, layer, meta.block_tables, meta.context_lens)
        span = keys.shape[1]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        mask = (torch.arange(span, device=q.device)[None, :] < meta.context_lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=True)
        return out.squeeze(2)

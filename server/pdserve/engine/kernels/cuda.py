"""CUDA kernels: cuBLAS linears (F.linear), SDPA for prefill (4-D: flash / memory-efficient
kernels; not cuDNN's, which builds a plan per shape), and decode attention over the block
tables through SDPA on blocks gathered into buffers reused across steps (no fresh allocation
per step and layer).

Where flashinfer-python is installed, decode attention runs FlashInfer's paged kernel instead
(kernels/flashinfer_decode.py): planned once a step, reading only the pages each sequence holds,
which the decode CUDA graphs need (a graph's block tables are as wide as max_model_len, and the
gather would copy all of it). The gather path stays for engines without it.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pdserve.engine.kernels import quant
from pdserve.engine.kernels.reference import BlockGather, Linear, TorchKernels
from pdserve.engine.quantization import QuantizedWeight

log = logging.getLogger(__name__)


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

    def paged_decode(self, num_heads, num_kv_heads, head_dim, block_size, max_blocks):
        """FlashInfer's paged decode where flashinfer-python is installed and passes a check
        against the SDPA path at load; None (the SDPA path) otherwise, saying why."""
        if self.dtype not in (torch.float16, torch.bfloat16):
            return None
        try:
            import flashinfer
        except ImportError:
            log.info("decode attention: SDPA over gathered blocks (pip install flashinfer-python for its paged kernel)")
            return None
        from pdserve.engine.kernels.flashinfer_decode import FlashInferDecode
        try:
            kernel = FlashInferDecode(flashinfer, self.device, self.dtype, num_heads, num_kv_heads, head_dim,
                                      block_size, max_blocks)
            kernel.check(super().decode_attention)
        except Exception as exc:   # a JIT build that fails, a head size it lacks, a wrong result
            log.warning("decode attention: SDPA over gathered blocks; FlashInfer %s is unusable here: %s",
                        getattr(flashinfer, "__version__", "?"), exc)
            return None
        log.info("decode attention: FlashInfer %s paged decode", getattr(flashinfer, "__version__", "?"))
        return kernel

    def quantized_linear(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> Linear:
        """int8 activations on the int8 tensor cores (torch._int_mm), fp8 on sm89+ (torch._scaled_mm)."""
        fast = {"int8": quant.IntMmLinear, "fp8": quant.ScaledMmLinear}.get(weight.activations)
        if fast is not None:
            return quant.checked(fast, weight, bias)
        return super().quantized_linear(weight, bias)

    def decode_attention(self, q, kv_cache: torch.Tensor, layer: int, meta):
        if meta.decode_plan is not None:   # FlashInfer's wrapper, planned for this step
            return meta.decode_plan.run(q.contiguous(), kv_cache[:, layer])
        keys, values = self.gather(kv_cache, layer, meta.block_tables, meta.context_lens)
        span = keys.shape[1]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        mask = (torch.arange(span, device=q.device)[None, :] < meta.context_lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=True)
        return out.squeeze(2)

"""One kernel set per device behind one interface (kernels/reference.py's TorchKernels).

    cpu   kernels/cpu.py   oneDNN prepacked linears, C++ paged decode attention, 4-D SDPA prefill
    cuda  kernels/cuda.py  cuBLAS linears, SDPA (flash / memory-efficient) over block tables
    npu   kernels/npu.py   torch_npu fused RMSNorm and add+RMSNorm where installed, SDPA attention
    any   reference.py     plain torch: the reference every fast kernel is tested against

PDSERVE_KERNELS=torch forces the reference set on any device (for debugging and comparisons).
"""
from __future__ import annotations

import os

import torch

from pdserve.engine.kernels.reference import Linear, TorchKernels

__all__ = ["Linear", "TorchKernels", "kernels_for"]


def kernels_for(device: torch.device, dtype: torch.dtype) -> TorchKernels:
    if os.environ.get("PDSERVE_KERNELS", "") == "torch":
        return TorchKernels(device, dtype)
    if device.type == "cpu":
        from pdserve.engine.kernels.cpu import CpuKernels
        return CpuKernels(device, dtype)
    if device.type == "cuda":
        from pdserve.engine.kernels.cuda import CudaKernels
        return CudaKernels(device, dtype)
    if device.type == "npu":
        from pdserve.engine.kernels.npu import NpuKernels
        return NpuKernels(device, dtype)
    return TorchKernels(device, dtype)

"""Ascend NPU kernels: torch_npu's fused RMSNorm and add+RMSNorm where torch_npu provides them;
plain torch (kernels/reference.py) for everything else, attention included (SDPA over the
gathered blocks; torch_npu's paged fused attention, npu_fused_infer_attention_score with a
block table, is the next step and would plug in behind decode_attention()).

This module imports torch_npu only when an engine runs on npu:N (engine/devices.py has already
imported it then). It was written against torch_npu's documented operators and has not been run
on Ascend hardware in this repository's CI: each fused call falls back to the reference when the
operator is absent.
"""
from __future__ import annotations

import logging

import torch

from pdserve.engine.kernels.reference import TorchKernels

log = logging.getLogger(__name__)


class NpuKernels(TorchKernels):
    name = "npu"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)
        try:
            import torch_npu
        except ImportError:  # torch_npu missing: the reference runs
            torch_npu = None
        self.npu = torch_npu
        self.has_rms_norm = torch_npu is not None and hasattr(torch_npu, "npu_rms_norm")
        self.has_add_rms_norm = torch_npu is not None and hasattr(torch_npu, "npu_add_rms_norm")

    def describe(self) -> str:
        fused = [name for name, ok in (("npu_rms_norm", self.has_rms_norm),
                                       ("npu_add_rms_norm", self.has_add_rms_norm)) if ok]
        return f"npu kernels ({self.dtype}): fused {', '.join(fused) or 'none (torch_npu missing)'}; attention SDPA"

    def rms_norm(self, x, weight, eps):
        if self.has_rms_norm:
            return self.npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]
        return super().rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        if self.has_add_rms_norm:
            y, _, summed = self.npu.npu_add_rms_norm(x, residual, weight.to(x.dtype), epsilon=eps)
            return y, summed
        return super().add_rms_norm(x, residual, weight, eps)

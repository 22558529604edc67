"""The linears of quantized weights (engine/quantization.py's QuantizedWeight), behind the kernel
sets' `linear` factory: the model hands kernels.linear() a QuantizedWeight and gets one of these.

    FakeQuantLinear  reference, any device: the inputs quantized and dequantized per token, times
                     the dequantized weight, in float32. It is what transformers computes for a
                     compressed-tensors W8A8 checkpoint, and what every fast path is tested against.
    OneDnnInt8Linear cpu: oneDNN's int8 GEMM (VNNI / AMX-INT8) on the weight prepacked once, the
                     inputs quantized per token and passed with scale 1 (oneDNN takes one input
                     scale per tensor), each row's scale applied to the float32 result.
    IntMmLinear      cuda: torch._int_mm (int8 tensor cores); rows padded past its 16-row minimum.
    ScaledMmLinear   cuda sm89+: torch._scaled_mm on fp8 e4m3 with row-wise scales.

Weights with 16-bit activations (W4A16, W8A16) run as dense linears of the dequantized weight on
every device: torch's CPU int4 GEMM does not block over rows (docs/models.md, bench/RESULTS.md).
Each fast path is checked against FakeQuantLinear when it is built and falls back to it.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pdserve.engine.kernels.reference import Linear
from pdserve.engine.quantization import QuantizedWeight, quantize_fp8_per_token, quantize_int8_per_token

log = logging.getLogger(__name__)

PER_TOKEN = {"int8": quantize_int8_per_token, "fp8": quantize_fp8_per_token}


class FakeQuantLinear(Linear):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__(weight.dequantize(torch.float32), None if bias is None else bias.float())
        self.quantize = PER_TOKEN[weight.activations]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values, scale = self.quantize(x)
        return F.linear(values.float() * scale, self.weight, self.bias).to(x.dtype)


class _RowScaled(Linear):
    """Quantizes the rows, runs an integer or fp8 GEMM, scales each row of its float32 result."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        self.weight = None                       # each subclass keeps the form its GEMM reads
        self.bias = None if bias is None else bias.float()
        self.quantize = PER_TOKEN[weight.activations]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if x.shape[0] == 0:
            return x.new_empty((0, self.out_features))
        values, scale = self.quantize(x)
        out = self.gemm(values, scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.to(x.dtype)

    def gemm(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """[rows, K] quantized inputs and their [rows, 1] scales -> [rows, N] float32."""
        raise NotImplementedError


class OneDnnInt8Linear(_RowScaled):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        self.packed = torch.ops.onednn.qlinear_prepack(weight.values.contiguous(), None)
        self.w_scale = weight.scale.reshape(-1).float().contiguous()
        self.w_zero = torch.zeros(self.out_features, dtype=torch.long)

    def gemm(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(values, 1.0, 0, self.packed, self.w_scale, self.w_zero, None,
                                                  1.0, 0, torch.float32, "none", [], "").mul_(scale)


class IntMmLinear(_RowScaled):
    MIN_ROWS = 17        # torch._int_mm on CUDA takes more than 16 rows

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        self.w_t = weight.values.t().contiguous().t()       # column-major, as cuBLASLt wants it
        self.w_scale = weight.scale.reshape(1, -1).float()

    def gemm(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows = values.shape[0]
        if rows < self.MIN_ROWS:
            values = F.pad(values, (0, 0, 0, self.MIN_ROWS - rows))
        return torch._int_mm(values, self.w_t)[:rows].float().mul_(self.w_scale).mul_(scale)


class ScaledMmLinear(_RowScaled):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        self.w_t = weight.values.t()                          # column-major view of [N, K]
        self.w_scale = weight.scale.reshape(1, -1).float().contiguous()

    def gemm(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(values, self.w_t, scale_a=scale, scale_b=self.w_scale,
                                out_dtype=torch.bfloat16).float()


def checked(fast: type[_RowScaled], weight: QuantizedWeight, bias: torch.Tensor | None, rows=(3, 40)) -> Linear:
    """The fast linear where it builds and agrees with the reference at a few row counts, else
    the reference (with the reason in the log)."""
    reference = FakeQuantLinear(weight, bias)
    try:
        linear = fast(weight, bias)
        for n in rows:
            x = torch.randn(n, weight.shape[1], device=weight.device)
            want, got = reference(x), linear(x)
            if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()) + 1e-5):
                raise RuntimeError(f"disagrees with the reference at {n} rows")
        return linear
    except Exception as exc:   # e.g. an op this build or device lacks
        log.info("%s unavailable for %s: %s; the reference runs", fast.__name__, tuple(weight.shape), exc)
        return reference

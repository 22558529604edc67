"""CPU kernels: oneDNN linears with prepacked weights, decode attention straight from the paged
pool (a small C++ kernel, no gather), 4-D SDPA for prefill.

Why each piece (docs/engine.md; the measurements are in bench/RESULTS.md):
- Linears: MKL's sgemm repacks the weight on every call; at decode sizes (32 rows) that costs
  about as much as the multiply. oneDNN with the weight reordered once at load
  (torch.ops.mkldnn._reorder_linear_weight + _linear_pointwise) skips it. In bfloat16 oneDNN
  needs native bf16 support (avx512_bf16, AMX or avx_ne_convert); without it torch's own bf16
  GEMM is slow, so the weights are kept in float32 for the GEMM (see `native_bf16`).
- Linears of a decode step (a few rows): the weights stream from memory once per step, and
  oneDNN's blocked weights run well below the memory's speed there. In float32, weight panels
  (16 outputs' weights, one contiguous [K][16] run) are read in order, with the next panel
  prefetched while one is multiplied; in bf16 (AMX tiles, or avx512_bf16 dot products), the
  weight is laid out as the tile multiplies read it (pack_tiles), a few long runs per thread.
  Prefill (many rows) stays on oneDNN, which is faster there; the linear keeps both forms.
- The compiled kernels let go of the GIL while they run, so the engine process's asyncio thread
  (streaming the outputs) is not held up by them.
- Decode attention: gathering each sequence's blocks into a padded tensor reads and writes the
  whole context twice per layer and allocates it fresh every step; the kernel (kernels/csrc)
  walks the block table and reads every key and value once, in place, with an online softmax
  per head group (GQA heads share each key load). With avx512_bf16 and a bf16 pool, both
  products are bf16 dot products over 16 keys at a time (keys half transposed, one cross-lane sum
  per 16 keys and head); with AMX, tile multiplies (the keys tile-loaded straight from the pool,
  no transpose). Without a build (no AVX2, or PDSERVE_CPU_ATTENTION=torch) a gather into reused
  buffers followed by grouped matmuls runs.
- Threads: engines run with OMP_WAIT_POLICY=PASSIVE (the front end and clients share the cores),
  so each OpenMP region wakes a sleeping thread, tens of microseconds on a VM, about 50 times a
  decode step. A decode step's forward, whose parallel work is all in the compiled kernels, runs
  on their own team instead (kernels/csrc/hot_team.h), whose workers spin between the step's
  kernels and sleep when it ends (`step_threads`; only under PASSIVE; PDSERVE_HOT_TEAM=0 turns
  it off).
- The compiled kernels are built at install, one module per instruction set
  (kernels/variants.py), and the one this CPU's flags allow is imported: an engine start never
  runs a compiler, and a missing build is an error that says to run `make setup`.
- Prefill: whole prompts (no cached prefix) run a flash attention on the AVX-512 builds in
  float32 (FMAs) and on the avx512_bf16 and AMX builds in bfloat16 (bf16 dot products, or tile
  multiplies with AMX): kernels/csrc, the softmax in float32 down the columns of transposed
  scores, the whole flat batch in one call read through the QKV output's strides. torch's SDPA
  flash kernel for CPU (4-D inputs, kernels/reference.py) runs its products far below the
  linears' speed. The AVX2 build, other head sizes and pieces after a cached prefix take SDPA.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import os

import torch
import torch.nn.functional as F

from pdserve.engine.kernels import quant, variants
from pdserve.engine.kernels.reference import BlockGather, Linear, SiluGateUp, TorchKernels
from pdserve.engine.quantization import QuantizedWeight

log = logging.getLogger(__name__)

EXT_HEAD_SIZES = (16, 32, 64, 80, 96, 128, 256)
_NONE = torch.empty(0)   # rms_norm without a residual


class KernelsNotBuilt(RuntimeError):
    """The compiled kernels this CPU needs are not installed: an engine start never compiles them."""


# the int8 dot products oneDNN's int8 GEMM needs to be exact (VNNI, AMX-INT8)
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN's bf16 GEMM runs fast)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})


def load_variant(variant: variants.Variant):
    """The variant's module as setup.py built it."""
    try:
        return importlib.import_module(variant.module)
    except ImportError as exc:
        raise KernelsNotBuilt(
            f"pdserve's CPU kernels for this CPU ({variant.name}) are not built ({exc}): run `make setup` "
            "(or `pip install --no-build-isolation -e .` after torch); PDSERVE_CPU_ATTENTION=torch runs the "
            "slower portable torch path without them") from exc


def extension():
    """(module, what it is) for this CPU's build of the compiled kernels, or (None, why not) where
    the portable torch path runs. Raises KernelsNotBuilt where the build this CPU runs is missing:
    a clear failure at start rather than an engine silently at a fraction of its speed."""
    if os.environ.get("PDSERVE_CPU_ATTENTION", "") == "torch":
        return None, "disabled by PDSERVE_CPU_ATTENTION=torch"
    variant = variants.choose(cpu_flags())
    if variant is None:
        return None, "no build for this CPU: it lacks AVX2 and FMA or is not x86"
    return load_variant(variant), f"{variant.name} build"


def hot_team_wanted() -> bool:
    """Whether decode steps run on the kernels' own team: where OpenMP's idle threads sleep
    (OMP_WAIT_POLICY=PASSIVE, as pdserve starts its engines), unless PDSERVE_HOT_TEAM=0. Where
    they spin (ACTIVE, or libgomp's default spin before sleeping) they are awake already, and a
    second spinning team would take their cores."""
    return (os.environ.get("PDSERVE_HOT_TEAM", "1") != "0"
            and os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE")


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """A [N, K] weight as panel_linear reads it: [ceil(N / 16), K, 16], each panel the weights of
    16 outputs (the last one zero-padded), one contiguous run."""
    n, k = weight.shape
    panels = -(-n // 16)
    padded = F.pad(weight, (0, 0, 0, panels * 16 - n))
    return padded.view(panels, 16, k).transpose(1, 2).contiguous()


TILE_GROUP_OUTPUTS = 16 * 2   # outputs per group of bf16 weight tiles (kernels/csrc: TILE_GROUP panels of 16)


def pack_tiles(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 [N, K] weight (K a multiple of 32) as tile_linear reads it: [ceil(N / 32), K / 32,
    2, 16, 16, 2], per group of 32 outputs and 32 k the two B tiles of 16 outputs, each
    [16 k pairs][16 outputs][2]; the last group zero-padded."""
    n, k = weight.shape
    groups = -(-n // TILE_GROUP_OUTPUTS)
    padded = F.pad(weight, (0, 0, 0, groups * TILE_GROUP_OUTPUTS - n))
    return padded.view(groups, 2, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous()


def interleave_halves(t: torch.Tensor) -> torch.Tensor:
    """[gate; up] rows (2I, I a multiple of 16) reordered by 16: gate 0-15, up 0-15, gate 16-31, ...
    so that each group of weight tiles holds the gate and up rows of the same 16 outputs."""
    half = t.shape[0] // 2
    return t.view(2, half // 16, 16, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


# Up to this many rows (a decode step's batch), float32 linears run on weight panels
# (panel_linear above): there the weights' memory traffic dominates. More rows (prefill) run on
# oneDNN, which is faster once the multiply dominates. bf16 linears on weight tiles: up to 32 rows
# (two AMX tiles of rows; above that oneDNN's blocking wins).
PANEL_ROWS_MAX = 64
TILE_ROWS_MAX = 32


def disagreement(prepared, reference, weight: torch.Tensor, row_counts) -> int | None:
    """The first row count at which a prepared linear's output and the reference's differ beyond
    a bf16 rounding (random rows in the weight's dtype), or None: the load-time check of a path."""
    for rows in row_counts:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        if not torch.allclose(prepared(x).float(), reference(x).float(), rtol=2e-2, atol=2e-2):
            return rows
    return None


class PackedLinear(Linear):
    """oneDNN linear over a weight reordered once into its blocked layout; with the compiled
    kernels, also the weight as steps of a few rows read it: float32 panels, or bf16 weight tiles
    (tiles=True: the build runs them). The plain weight is not kept: each form holds what its
    path reads."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, ext=None,
                 tiles: bool = False):
        super().__init__(weight, bias)
        self.weight = None
        self.packed = packed
        self.ext = ext
        self.panels = pack_panels(weight) if ext is not None and weight.dtype == torch.float32 else None
        self.tiles = (pack_tiles(weight) if ext is not None and tiles and weight.dtype == torch.bfloat16
                      and weight.shape[1] % 32 == 0 else None)
        self._bias = bias.contiguous() if bias is not None else _NONE

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        rows = x.shape[0]
        if self.panels is not None and rows <= PANEL_ROWS_MAX and x.dtype == torch.float32 and x.stride(1) == 1:
            out = torch.empty((rows, self.out_features), dtype=x.dtype)
            self.ext.panel_linear(out, x, self.panels, self._bias)
            return out
        if self.tiles is not None and 0 < rows <= TILE_ROWS_MAX and x.dtype == torch.bfloat16 and x.stride(1) == 1:
            out = torch.empty((rows, self.out_features), dtype=x.dtype)
            if self.ext.tile_linear(out, x, self.tiles, self._bias, False):
                return out
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class TiledSiluGateUp(SiluGateUp):
    """bf16 weight tiles: steps of up to TILE_ROWS_MAX rows multiply them (gate and up rows
    interleaved by 16) with SiLU-and-mul in the kernel's epilogue; more rows take the linear
    (oneDNN), then the op."""

    def __init__(self, linear: Linear, silu_and_mul, ext, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(linear, silu_and_mul)
        self.ext = ext
        self.tiles = pack_tiles(interleave_halves(weight))
        self._bias = interleave_halves(bias).contiguous() if bias is not None else _NONE

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() == 2 and 0 < rows <= TILE_ROWS_MAX and x.dtype == torch.bfloat16 and x.stride(1) == 1:
            out = torch.empty((rows, self.out_features), dtype=x.dtype)
            if self.ext.tile_linear(out, x, self.tiles, self._bias, True):
                return out
        return super().__call__(x)


class UpcastLinear(Linear):
    """bfloat16 model on a CPU without native bf16: the GEMM runs in float32 on the bf16 weight's
    exact float32 copy (same values), the result is rounded back to bfloat16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, inner: Linear):
        super().__init__(weight, bias)
        self.inner = inner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


class CpuKernels(TorchKernels):
    name = "cpu"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)
        self.onednn = torch.backends.mkldnn.is_available()
        self.bf16_native = native_bf16()
        self.ext, self.ext_note = extension()
        self.panel_linears = self.ext is not None   # every build has the AVX2 panels
        self.tile_linears = self._tile_linears_run()
        self.gather = BlockGather(device)
        self.prefill_kernel = self._prefill_kernel_runs()
        self.hot_team = self.ext is not None and hot_team_wanted()
        self.other_linears = False   # a linear off the panels and tiles (quantized, plain torch) was made

    @contextlib.contextmanager
    def step_threads(self, decode_rows: int):
        """A decode step whose linears all run on weight panels or tiles (float32 panels, bf16
        tiles; no quantized or plain linear loaded) computes on the kernels' hot team."""
        rows_max = PANEL_ROWS_MAX if self.panel_linears and self.dtype == torch.float32 else (
            TILE_ROWS_MAX if self.tile_linears else 0)
        threads = torch.get_num_threads()
        if not (self.hot_team and 0 < decode_rows <= rows_max and threads > 1 and not self.other_linears):
            yield
            return
        self.ext.set_hot(threads)
        try:
            yield
        finally:
            self.ext.set_hot(0)

    def _tile_linears_run(self) -> bool:
        """Whether this build runs bf16 linears on weight tiles (AMX, or avx512_bf16 dot products
        where there is no AMX; asked with no rows)."""
        if self.ext is None or self.dtype != torch.bfloat16:
            return False
        empty = torch.empty(0, 32, dtype=self.dtype)
        return self.ext.tile_linear(empty, empty, empty, _NONE, False)

    def _prefill_kernel_runs(self) -> bool:
        """Whether this build runs the prefill attention kernel in this dtype (asked with an empty
        batch: it says whether it ran)."""
        if self.ext is None or self.dtype not in (torch.float32, torch.bfloat16):
            return False
        q, kv = torch.empty(0, 1, 64, dtype=self.dtype), torch.empty(0, 1, 64, dtype=self.dtype)
        return self.ext.prefill_attention(torch.empty_like(q), q, kv, kv, torch.empty(0, 2, dtype=torch.long), 1.0)

    def describe(self) -> str:
        lin = "oneDNN prepacked" if self.onednn else "torch"
        if self.onednn and self.panel_linears and self.dtype == torch.float32:
            lin += f" (up to {PANEL_ROWS_MAX} rows: weight panels)"
        if self.tile_linears:
            lin += f" (up to {TILE_ROWS_MAX} rows: bf16 weight tiles)"
        if self.dtype == torch.bfloat16 and not self.bf16_native:
            lin += " (float32 GEMM on bf16 weights: this CPU has no native bf16)"
        att = "C++ paged kernel" if self.ext is not None else "gather into reused buffers + matmul"
        products = ("float32 FMAs" if self.dtype == torch.float32 else "AMX tiles" if "amx" in self.ext_note
                    else "bf16 dot products")
        pre = (f"flash kernel on {products} (head sizes 64, 128; after a cached prefix: 4-D SDPA)"
               if self.prefill_kernel else "4-D SDPA")
        team = "; decode steps on the kernels' hot team" if self.hot_team else ""
        return f"cpu kernels ({self.dtype}, {self.ext_note}): linears {lin}; decode attention {att}; prefill {pre}{team}"

    # ---- linears ------------------------------------------------------------------------------
    def _packed(self, weight: torch.Tensor, bias: torch.Tensor | None, tiles: bool = True) -> Linear:
        if not self.onednn:
            self.other_linears = True
            return Linear(weight, bias)
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
            linear = PackedLinear(weight, bias, packed, self.ext if self.panel_linears else None,
                                  tiles=tiles and self.tile_linears)
            # every path: panels or tiles (a few rows), oneDNN
            rows = disagreement(linear, lambda x: F.linear(x, weight, bias), weight, (3, 17, PANEL_ROWS_MAX + 1))
            if rows:
                raise RuntimeError(f"the prepared linear disagrees with F.linear at {rows} rows")
            return linear
        except Exception as exc:  # e.g. bf16 on a CPU oneDNN cannot run it on
            log.info("oneDNN prepacked linear unavailable for %s %s: %s", tuple(weight.shape), weight.dtype, exc)
            self.other_linears = True
            return Linear(weight, bias)

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        if isinstance(weight, QuantizedWeight):
            return self.quantized_linear(weight, bias)
        if weight.dtype == torch.bfloat16 and not self.bf16_native:
            inner = self._packed(weight.float(), None if bias is None else bias.float())
            return UpcastLinear(weight, bias, inner)
        return self._packed(weight, bias)

    def silu_gate_up(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SiluGateUp:
        """bf16 weight tiles: the activation in the decode linear's epilogue (TiledSiluGateUp), checked
        once against the separate ops; the weight's second form is the interleaved tiles, so the
        linear for larger steps keeps only oneDNN's."""
        if not (self.tile_linears and not isinstance(weight, QuantizedWeight) and weight.dtype == torch.bfloat16
                and weight.shape[0] % 32 == 0 and weight.shape[1] % 32 == 0):
            return super().silu_gate_up(weight, bias)
        fused = TiledSiluGateUp(self._packed(weight, bias, tiles=False), self.silu_and_mul, self.ext, weight, bias)
        if disagreement(fused, lambda x: super(CpuKernels, self).silu_and_mul(F.linear(x, weight, bias)), weight, (3,)):
            log.info("the fused gate_up disagrees with the separate ops for %s; running them apart", tuple(weight.shape))
            return super().silu_gate_up(weight, bias)
        return fused

    def quantized_linear(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> Linear:
        """int8 activations: oneDNN's int8 GEMM (VNNI / AMX-INT8; kernels/quant.py) on CPUs with
        an int8 dot product; without one (AVX2 only) oneDNN's path sums u8 x s8 pairs in int16,
        which saturates (one row's outputs off by 10x on a Zen 3), so the reference runs."""
        self.other_linears = True
        if weight.activations == "int8" and self.onednn and cpu_flags() & INT8_DOT_FLAGS:
            return quant.checked(quant.OneDnnInt8Linear, weight, bias)
        return super().quantized_linear(weight, bias)

    # ---- the layer body -----------------------------------------------------------------------
    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """One pass per row on both cores (torch's max over a 151,936-token bfloat16 vocabulary
        is several times slower); the same first-of-ties and NaN rules."""
        if self._fused(logits):
            out = torch.empty(logits.shape[0], dtype=torch.long)
            self.ext.argmax_rows(out, logits)
            return out
        return super().argmax(logits)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """In place on x (a view into the QKV output): no concatenated copy of x. The compiled
        kernel does it in one call (the torch ops are several small ones per layer)."""
        if (self.ext is not None and x.dim() == 3 and x.stride(-1) == 1 and x.dtype in (torch.float32, torch.bfloat16)
                and cos.dtype == sin.dtype == x.dtype and cos.dim() == sin.dim() == 3
                and cos.stride(-1) == sin.stride(-1) == 1):
            self.ext.rope(x, cos, sin)
            return x
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[..., :half], sin[..., :half]
        r1 = x1 * c - x2 * s
        x2.mul_(c).addcmul_(x1, s)
        x1.copy_(r1)
        return x

    def _fused(self, *tensors: torch.Tensor) -> bool:
        """Whether the compiled kernels take these: float32 or bfloat16 rows, unit last stride."""
        return self.ext is not None and all(
            t.dtype in (torch.float32, torch.bfloat16) and t.dim() == 2 and t.stride(-1) == 1 for t in tensors)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not self._fused(x) or weight.shape != x.shape[-1:]:
            return super().rms_norm(x, weight, eps)
        out = torch.empty(x.shape, dtype=x.dtype)
        self.ext.rms_norm(out, x, _NONE, weight, eps)
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """One pass: residual += x (in place: the model drops the old residual), then its norm."""
        if not self._fused(x, residual) or residual.dtype != x.dtype or weight.shape != x.shape[-1:]:
            return super().add_rms_norm(x, residual, weight, eps)
        out = torch.empty(x.shape, dtype=x.dtype)
        self.ext.rms_norm(out, x, residual, weight, eps)
        return out, residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        half = gate_up.shape[-1] // 2
        if self._fused(gate_up):
            out = torch.empty((gate_up.shape[0], half), dtype=gate_up.dtype)
            self.ext.silu_and_mul(out, gate_up)
            return out
        gate = gate_up[..., :half]
        return F.silu(gate, inplace=True).mul_(gate_up[..., half:])

    def store_kv(self, kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta) -> None:
        if (self.ext is not None and k.dtype == kv_cache.dtype and k.dtype in (torch.float32, torch.bfloat16)
                and k.stride(-1) == 1 and k.stride(-2) == k.shape[-1] and v.stride(-1) == 1
                and v.stride(-2) == v.shape[-1]):
            self.ext.store_kv(kv_cache, layer, k, v, meta.slot_blocks, meta.slot_offsets)
            return
        super().store_kv(kv_cache, layer, k, v, meta)

    # ---- attention ----------------------------------------------------------------------------
    def prefill_attention(self, q, k, v, kv_cache: torch.Tensor, layer: int, meta):
        """Whole prompts on the kernel, all in one call; pieces after a cached prefix (and
        whatever the kernel does not take) on the reference's SDPA path."""
        if not (self.prefill_kernel and q.dtype == k.dtype == v.dtype == self.dtype
                and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
            return super().prefill_attention(q, k, v, kv_cache, layer, meta)
        bounds = meta.prefill_bounds
        cached = meta.prefill_cached or [0] * len(bounds)
        whole = [b for b, c in zip(bounds, cached) if c == 0]
        out = torch.empty(q.shape, dtype=q.dtype)
        if not self.ext.prefill_attention(out, q, k, v, torch.tensor(whole, dtype=torch.long).view(-1, 2),
                                          q.shape[-1] ** -0.5):
            return super().prefill_attention(q, k, v, kv_cache, layer, meta)
        for i, ((start, end), c) in enumerate(zip(bounds, cached)):
            if c:
                piece = dataclasses.replace(meta, prefill_bounds=[(0, end - start)], prefill_cached=[c],
                                            prefill_block_tables=[meta.prefill_block_tables[i]])
                out[start:end] = super().prefill_attention(q[start:end], k[start:end], v[start:end], kv_cache, layer, piece)
        return out

    def decode_attention(self, q, kv_cache: torch.Tensor, layer: int, meta):
        scale = q.shape[-1] ** -0.5
        if self.ext is not None and q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] in EXT_HEAD_SIZES:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            self.ext.paged_decode(out, q, kv_cache, layer, meta.block_tables, meta.context_lens, scale)
            return out
        return self._decode_gather_matmul(q, kv_cache, layer, meta, scale)

    def _decode_gather_matmul(self, q, kv_cache, layer: int, meta, scale: float):
        """No compiler: gather into buffers reused across steps, then grouped matmuls (GQA heads
        of one KV head share its keys) with a masked softmax."""
        keys, values = self.gather(kv_cache, layer, meta.block_tables, meta.context_lens)     # [S, span, KVH, D]
        seqs, span, kv_heads, dim = keys.shape
        heads = q.shape[1]
        group = heads // kv_heads
        keys = keys.permute(0, 2, 3, 1)                                       # [S, KVH, D, span]
        values = values.transpose(1, 2)                                       # [S, KVH, span, D]
        qg = q.view(seqs, kv_heads, group, dim) * scale
        scores = torch.matmul(qg, keys).float()                               # [S, KVH, G, span]
        pad = torch.arange(span, device=q.device)[None, :] >= meta.context_lens[:, None]
        scores.masked_fill_(pad[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1).to(q.dtype)
        return torch.matmul(probs, values).view(seqs, heads, dim)

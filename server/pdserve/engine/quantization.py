"""Quantized linear weights: the formats, their maths, and how a checkpoint's tensors become the
weights the kernel set's `linear` factory is handed (engine/kernels/quant.py runs them).

Two sources, one representation (QuantizedWeight: integer or fp8 values, a float32 scale per
output channel or per group of inputs, an optional zero point, and how the inputs are quantized):

- `quantization: int8` (or `fp8`) in config.pbtxt quantizes a float checkpoint at load, as vLLM's
  on-the-fly fp8 does: every linear but the LM head and the MoE routers, symmetric per output
  channel; the activations are quantized per token at run time (dynamic).
- compressed-tensors checkpoints (what llm-compressor writes and vLLM loads), read from
  config.json's `quantization_config`: W8A8 (int8 `weight` + per-channel `weight_scale`, dynamic
  per-token int8 activations) and W4A16 (`weight_packed` int32 words of eight 4-bit values,
  `weight_shape`, a `weight_scale` per group of inputs, `weight_zero_point` when asymmetric).

How the weights reach the factory without the models knowing: the checkpoint's tensors of one
module are bundled into a QuantizedWeight under the module's `.weight` key before the state dict
loads, so each family's own load hooks (Phi-3's split of fused weights, Mixtral's renames) move
it like any tensor. Loading it into the float parameter only tags that parameter with it
(QuantizedWeight is tensor-like: torch hands it its own `copy_`, `cat`, `stack`). After the model
moves to its device and dtype, attach() puts each tag in place of its float parameter; prepare()'s
concatenations (fused QKV, gate_up, stacked experts) then concatenate quantized weights, and
kernels.linear() sees a QuantizedWeight. Any other torch operation on one gets its dequantized
values (correct, only not quantized).
"""
from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

log = logging.getLogger(__name__)

INT8_MAX = 127
FP8_MAX = 448.0                    # float8_e4m3fn's largest finite value
TAG = "_pdserve_quantized"         # the attribute a float parameter carries its QuantizedWeight in
# Left in the model's dtype by on-the-fly quantization, as vLLM does: the LM head (its logits
# pick the tokens) and the MoE routers (tiny, and their top-k is sensitive).
UNQUANTIZED = re.compile(r"(^|\.)(lm_head|gate|shared_expert_gate)$")
# Families whose prepare() edits float weights in place (DeepSeek's MLA reorders rotary rows and
# splits kv_b_proj into absorbed weights): not quantized yet.
UNQUANTIZABLE_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


class QuantizationError(ValueError):
    """A checkpoint or setting pdserve cannot run quantized; the message says what can."""


# ---- the maths ----------------------------------------------------------------------------------
def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (values [N, K] int8, scale [N, 1] float32)."""
    w = weight.float()
    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / INT8_MAX
    return torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn per output channel: (values [N, K], scale [N, 1] float32)."""
    w = weight.float()
    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row, as vLLM quantizes activations: (values int8, scale [rows, 1]
    float32) with x ~= values * scale. The same function feeds every int8 kernel and the reference."""
    amax = x.abs().amax(-1, keepdim=True).float().clamp_min_(1e-12)
    return (x * (INT8_MAX / amax)).round_().to(torch.int8), amax / INT8_MAX


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(-1, keepdim=True).float().clamp_min_(1e-12)
    return (x * (FP8_MAX / amax)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), amax / FP8_MAX


def unpack_int32(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """compressed-tensors' pack-quantized words back to values: each row is a little-endian bit
    stream of `bits`-bit unsigned values (value + 2^(bits-1)), the first in the lowest bits.
    Returns [rows, columns] int8."""
    if bits not in (4, 8):
        raise QuantizationError(f"{bits}-bit packed weights are not supported (4 and 8 are)")
    if sys.byteorder != "little":
        raise QuantizationError("packed weights are read as little-endian words")
    data = packed.contiguous().view(torch.uint8)                     # [rows, 4 * words]
    if bits == 4:
        data = torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)
    return (data[:, :columns].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of unpack_int32 (rows padded to whole words): tests and tools write the format."""
    unsigned = (values.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    per_word = 32 // bits
    rows, columns = unsigned.shape
    unsigned = nn.functional.pad(unsigned, (0, -columns % per_word))
    if bits == 4:
        unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
    return unsigned.contiguous().view(torch.int32)


# ---- the representation -------------------------------------------------------------------------
_dequantized_ops: set[str] = set()


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A linear weight kept quantized: weight ~= (values - zero_point) * scale, per group.

    values [..., N, K] int8 (4-bit values too, unpacked) or float8_e4m3fn; scale [..., N, G]
    float32, G groups of K / G inputs each (G = 1: per output channel); zero_point like scale,
    int8, or None (symmetric). activations: how the kernel quantizes the inputs at run time:
    "int8" or "fp8" per token, or "none" (they stay in the model's dtype). Leading dims: stacked
    experts. Tensor-like (see the module docstring)."""

    values: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    activations: str = "int8"
    bits: int = 8

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def group_size(self) -> int:
        return self.values.shape[-1] // self.scale.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype dequantize() gives by default."""
        return torch.float32

    is_meta = False

    def dim(self) -> int:
        return self.values.dim()

    def detach(self) -> "QuantizedWeight":
        return self

    def nbytes(self) -> int:
        """Bytes as served (4-bit values count half a byte)."""
        values = self.values.numel() * self.bits // 8
        return values + sum(t.numel() * t.element_size() for t in (self.scale, self.zero_point) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = self.scale.shape[-1]
        v = self.values.float().unflatten(-1, (groups, -1))
        if self.zero_point is not None:
            v = v - self.zero_point.float().unsqueeze(-1)
        return (v * self.scale.unsqueeze(-1)).flatten(-2).to(dtype)

    def to(self, device) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)   # noqa: E731
        return replace(self, values=move(self.values), scale=move(self.scale.float()), zero_point=move(self.zero_point))

    def _parts(self, fn) -> list["QuantizedWeight"]:
        """Applies a splitting function along dim 0 to every tensor; one QuantizedWeight per part."""
        zps = fn(self.zero_point) if self.zero_point is not None else None
        return [replace(self, values=v, scale=s, zero_point=None if zps is None else zps[i])
                for i, (v, s) in enumerate(zip(fn(self.values), fn(self.scale)))]

    def split(self, sizes, dim: int = 0) -> list["QuantizedWeight"]:
        if dim != 0:
            return self.dequantize().split(sizes, dim)
        return self._parts(lambda t: t.split(sizes, 0))

    def chunk(self, chunks: int, dim: int = 0) -> list["QuantizedWeight"]:
        if dim != 0:
            return self.dequantize().chunk(chunks, dim)
        return self._parts(lambda t: t.chunk(chunks, 0))

    def __iter__(self):
        return iter(self._parts(lambda t: t.unbind(0)))

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getattr__(self, name: str):
        # Any other tensor method (a family that reshapes a weight itself): the dequantized values.
        if name.startswith("__") or name in ("values", "scale", "zero_point", "activations", "bits"):
            raise AttributeError(name)
        _note_dequantized(name)
        return getattr(self.dequantize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and isinstance(args[1], QuantizedWeight):
            setattr(args[0], TAG, args[1])       # load_state_dict: tag the float parameter
            return args[0]
        if func in (torch.cat, torch.stack) and kwargs.get("dim", args[1] if len(args) > 1 else 0) == 0:
            parts = list(args[0])
            if all(isinstance(p, QuantizedWeight) for p in parts) and _joinable(parts):
                join = lambda ts: func(ts, 0)    # noqa: E731
                zps = [p.zero_point for p in parts]
                return replace(parts[0], values=join([p.values for p in parts]),
                               scale=join([p.scale for p in parts]),
                               zero_point=None if zps[0] is None else join(zps))
        _note_dequantized(getattr(func, "__name__", str(func)))
        plain = lambda a: a.dequantize() if isinstance(a, QuantizedWeight) else a   # noqa: E731
        args = tuple([plain(x) for x in a] if isinstance(a, (list, tuple)) else plain(a) for a in args)
        return func(*args, **kwargs)


def _joinable(parts: list[QuantizedWeight]) -> bool:
    first = parts[0]
    return all((p.activations, p.bits, p.values.dtype, p.group_size, p.zero_point is None)
               == (first.activations, first.bits, first.values.dtype, first.group_size, first.zero_point is None)
               for p in parts)


def _note_dequantized(op: str) -> None:
    if op not in _dequantized_ops:
        _dequantized_ops.add(op)
        log.info("a quantized weight went through %s: that use gets its dequantized values", op)


def quantize_weight(weight: torch.Tensor, method: str) -> QuantizedWeight:
    """On-the-fly quantization of one float weight (`quantization: int8` / `fp8`)."""
    if method == "int8":
        values, scale = quantize_int8_per_channel(weight)
    elif method == "fp8":
        values, scale = quantize_fp8_per_channel(weight)
    else:
        raise QuantizationError(f"quantization '{method}' is unknown; use int8 or fp8")
    return QuantizedWeight(values, scale, activations=method, bits=8)


# ---- compressed-tensors -------------------------------------------------------------------------
@dataclass(frozen=True)
class CompressedScheme:
    """One config group of a compressed-tensors quantization_config, as pdserve runs it."""
    targets: tuple[str, ...]
    bits: int
    group_size: int          # 0: one scale per output channel (or per tensor)
    symmetric: bool
    activations: str         # "int8" (dynamic per token) or "none"

    def matches(self, module: str) -> bool:
        for target in self.targets:
            if target.startswith("re:"):
                if re.match(target[3:], module):
                    return True
            elif target == module or not ("." in target or target[:1].islower()):   # a class name: Linear
                return True
        return False

    def describe(self) -> str:
        weights = f"int{self.bits} " + (f"groups of {self.group_size}" if self.group_size else "per channel")
        acts = "dynamic per-token int8 activations" if self.activations == "int8" else "16-bit activations"
        return f"W{self.bits}A{8 if self.activations == 'int8' else 16} ({weights}{'' if self.symmetric else ', zero points'}, {acts})"


def _scheme(name: str, group: dict) -> CompressedScheme:
    w = group.get("weights") or {}
    a = group.get("input_activations")
    where = f"quantization_config.config_groups.{name}"
    if w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
        raise QuantizationError(f"{where}: weights {w.get('type')} {w.get('num_bits')}-bit are not supported; "
                                "pdserve runs compressed-tensors int8 (W8A8, W8A16) and int4 (W4A16) checkpoints")
    strategy = w.get("strategy")
    if strategy not in ("channel", "group", "tensor"):
        raise QuantizationError(f"{where}: weight strategy '{strategy}' is not supported (channel, group and tensor are)")
    if w.get("actorder") not in (None, "static", False):
        raise QuantizationError(f"{where}: activation-ordered groups (actorder {w.get('actorder')}) are not supported")
    activations = "none"
    if a:
        if a.get("type", "int") != "int" or a.get("num_bits") != 8 or not a.get("dynamic") or a.get("strategy") != "token":
            raise QuantizationError(f"{where}: input activations {a.get('type')} {a.get('num_bits')}-bit "
                                    f"{a.get('strategy')} {'dynamic' if a.get('dynamic') else 'static'} are not supported; "
                                    "pdserve quantizes activations dynamically per token to int8 (W8A8) or not at all")
        if not w.get("symmetric", True) or not a.get("symmetric", True) or w.get("num_bits") != 8:
            raise QuantizationError(f"{where}: int8 activations need symmetric 8-bit weights (W8A8)")
        activations = "int8"
    return CompressedScheme(tuple(group.get("targets") or ()), int(w["num_bits"]),
                            int(w.get("group_size") or 0) if strategy == "group" else 0,
                            bool(w.get("symmetric", True)), activations)


def _module_weight(prefix: str, state: dict, scheme: CompressedScheme) -> QuantizedWeight:
    """Pops one module's compressed tensors from the state dict; returns its QuantizedWeight."""
    scale = state.pop(f"{prefix}.weight_scale").float()
    if f"{prefix}.weight_packed" in state:
        shape = [int(d) for d in state.pop(f"{prefix}.weight_shape")]
        values = unpack_int32(state.pop(f"{prefix}.weight_packed"), scheme.bits, shape[1])
    else:
        values = state.pop(f"{prefix}.weight")
        if values.dtype != torch.int8:
            raise QuantizationError(f"{prefix}.weight is {values.dtype}; a quantized checkpoint stores it as int8")
    n, k = values.shape
    scale = scale.reshape(n, -1) if scale.numel() > 1 else scale.reshape(1, 1).expand(n, 1).contiguous()
    if k % scale.shape[1]:
        raise QuantizationError(f"{prefix}: {k} inputs do not split into {scale.shape[1]} scale groups")
    zero_point = state.pop(f"{prefix}.weight_zero_point", None)
    if zero_point is not None and not scheme.symmetric:
        if zero_point.dtype == torch.int32:          # pack-quantized: packed along the output channels
            zero_point = unpack_int32(zero_point.t(), scheme.bits, n).t()
        zero_point = zero_point.reshape(n, -1).to(torch.int8).contiguous()
    else:
        zero_point = None
    g_idx = state.pop(f"{prefix}.weight_g_idx", None)
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // (k // scale.shape[1])):
        raise QuantizationError(f"{prefix}: reordered groups (weight_g_idx) are not supported")
    return QuantizedWeight(values, scale, zero_point, scheme.activations, scheme.bits)


# ---- what one engine runs -----------------------------------------------------------------------
@dataclass(frozen=True)
class QuantPlan:
    """How an engine's linears are quantized: method "" (not at all), "int8" / "fp8" (on the
    fly, from config.pbtxt), or "compressed-tensors" (the checkpoint's own schemes)."""
    method: str = ""
    schemes: tuple[CompressedScheme, ...] = ()

    def describe(self) -> str:
        if self.method == "compressed-tensors":
            return "compressed-tensors " + "; ".join(s.describe() for s in self.schemes)
        return {"int8": "int8 at load (per-channel weights, dynamic per-token int8 activations)",
                "fp8": "fp8 at load (per-channel e4m3 weights, dynamic per-token fp8 activations)"}.get(self.method, "none")

    def bundle(self, state: dict[str, torch.Tensor]) -> dict:
        """A compressed checkpoint's state dict with each quantized module's tensors bundled into
        one QuantizedWeight under its `.weight` key (in place; returned)."""
        if self.method != "compressed-tensors":
            return state
        for key in [k for k in state if k.endswith(".weight_scale")]:
            prefix = key[:-len(".weight_scale")]
            scheme = next((s for s in self.schemes if s.matches(prefix)), None)
            if scheme is None:
                raise QuantizationError(f"{prefix} is quantized but no quantization_config group targets it")
            state[f"{prefix}.weight"] = _module_weight(prefix, state, scheme)
        leftover = [k for k in state if k.rsplit(".", 1)[-1] in ("input_scale", "input_zero_point", "weight_global_scale")]
        if leftover:
            raise QuantizationError(f"static activation scales ({leftover[0]}) are not supported: pdserve quantizes "
                                    "activations dynamically per token")
        return state


def plan(hf_config, quantization: str, device: torch.device) -> QuantPlan:
    """The plan for a checkpoint's config and the `quantization` parameter; QuantizationError for
    what cannot run here (fp8 off an sm89+ GPU, a scheme pdserve lacks, quantizing twice)."""
    method = (quantization or "").lower()
    method = "" if method == "none" else method
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    model_type = getattr(hf_config, "model_type", "")
    if (method or qc) and model_type in UNQUANTIZABLE_MODEL_TYPES:
        raise QuantizationError(f"quantized {model_type} models are not supported yet; serve it unquantized "
                                f"(drop `quantization`) or use another family")
    if qc:
        kind = qc.get("quant_method")
        if kind != "compressed-tensors":
            raise QuantizationError(f"quantized checkpoints of quant_method '{kind}' are not supported; pdserve loads "
                                    "compressed-tensors (llm-compressor's W8A8 and W4A16) or quantizes a float "
                                    "checkpoint itself with `quantization: int8`")
        if method:
            raise QuantizationError(f"the checkpoint is already quantized (compressed-tensors); drop the "
                                    f"`quantization: {quantization}` parameter")
        groups = qc.get("config_groups") or {}
        if not groups:
            raise QuantizationError("quantization_config has no config_groups")
        return QuantPlan("compressed-tensors", tuple(_scheme(name, g) for name, g in groups.items()))
    if method == "fp8" and not fp8_capable(device):
        raise QuantizationError(f"quantization fp8 needs a CUDA GPU of compute capability 8.9 or newer "
                                f"(Ada, Hopper); this engine runs on {device}: use int8")
    if method not in ("", "int8", "fp8"):
        raise QuantizationError(f"quantization '{quantization}' is unknown; use int8 or fp8")
    return QuantPlan(method)


def fp8_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def attach(model: nn.Module, quant: QuantPlan, device: torch.device) -> str:
    """After the model moved to its device and dtype: each linear's QuantizedWeight (from the
    checkpoint, or made now from its float weight) replaces the float parameter. Returns a line
    for the load log: what was quantized and the weights' bytes."""
    if not quant.method:
        return "quantization: none"
    count, before, after = 0, 0, 0
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        qw = getattr(weight, TAG, None)
        if qw is None and quant.method in ("int8", "fp8") and isinstance(module, nn.Linear) and not UNQUANTIZED.search(name):
            qw = quantize_weight(weight.detach(), quant.method)
        if qw is None:
            continue
        module._parameters["weight"] = qw.to(device)     # the float parameter goes
        count += 1
        before += weight.numel() * weight.element_size()
        after += qw.nbytes()
    return (f"quantization: {quant.describe()}: {count} linears, their weights {after / 2**20:.1f} MiB "
            f"(in the model's dtype {before / 2**20:.1f} MiB)")

"""Tensor parallelism as arithmetic: what each rank of an instance holds, and how a prompt's KV
moves between a PREFILL and a DECODE instance of different sizes. No processes, no devices:
the runtime that uses these (engine/ranks.py) and the tests (tests/test_tensor_parallel.py)
share one definition.

Megatron's split of the Llama family: the query heads and their KV heads (QKV column-parallel,
O row-parallel), the MLP's intermediate rows (gate_up column-parallel, down row-parallel) and
the vocabulary (embedding and LM head) are cut in consecutive ranges, rank r holding the r-th.
Norms and rotary tables are whole on every rank. KV heads are never replicated: a size that
does not divide them is refused (a replica would cost its memory on every rank and make a PD
handoff ambiguous).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # torch-free at run time: the front end validates configs with check_divisible
    import torch

# The families whose modules shard (engine/models/llama.py); others serve with size 1.
SHARDED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SIZES_HINT = "a tensor_parallel_size that divides num_attention_heads and num_key_value_heads"


def split(total: int, size: int, rank: int) -> range:
    """Rank `rank`'s consecutive share of `total` rows cut in `size`: ceil(total / size) each,
    the last ranks fewer (or none) when it does not divide."""
    per = -(-total // size)
    return range(min(total, rank * per), min(total, (rank + 1) * per))


def check_divisible(size: int, num_heads: int, num_kv_heads: int) -> str:
    """Why `size` cannot shard a model with these heads ("" when it can)."""
    if size < 1:
        return f"tensor_parallel_size is {size}; it must be at least 1"
    if num_heads % size:
        return f"num_attention_heads {num_heads} is not divisible by tensor_parallel_size {size}; use {SIZES_HINT}"
    if num_kv_heads % size:
        return (f"num_key_value_heads {num_kv_heads} is not divisible by tensor_parallel_size {size} "
                f"(KV heads are not replicated); use {SIZES_HINT}")
    return ""


@dataclass(frozen=True)
class Shard:
    """What one rank of a tensor-parallel instance holds (ranges of the full model's rows)."""
    rank: int
    size: int
    heads: range          # query heads (q_proj rows / head_dim, o_proj columns / head_dim)
    kv_heads: range       # KV heads (k_proj and v_proj rows / head_dim, the paged pool's heads)
    ffn_rows: range       # intermediate rows (gate_proj and up_proj rows, down_proj columns)
    vocab_rows: range     # embedding and LM head rows
    vocab_per_rank: int   # every rank's padded share: the LM head's logits are gathered at this width
    head_dim: int


def model_shape(config) -> tuple[int, int, int, int, int]:
    """(heads, kv_heads, head_dim, intermediate_size, vocab_size) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim, config.intermediate_size, config.vocab_size


def shard_of(rank: int, size: int, config) -> Shard:
    """Rank `rank`'s share of a model; raises ValueError for a size the heads do not allow."""
    heads, kv_heads, head_dim, ffn, vocab = model_shape(config)
    why = check_divisible(size, heads, kv_heads)
    if why:
        raise ValueError(why)
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of {size}")
    return Shard(rank, size, split(heads, size, rank), split(kv_heads, size, rank), split(ffn, size, rank),
                 split(vocab, size, rank), -(-vocab // size), head_dim)


def rank_config(config, shard: Shard):
    """The transformers config of one rank's model: the same layers over its share of heads,
    intermediate rows and vocabulary (a model family builds its rank's modules from it)."""
    mine = copy.deepcopy(config)
    mine.num_attention_heads = len(shard.heads)
    mine.num_key_value_heads = len(shard.kv_heads)
    mine.head_dim = shard.head_dim             # no longer hidden_size // num_attention_heads
    mine.intermediate_size = len(shard.ffn_rows)
    mine.vocab_size = len(shard.vocab_rows)
    return mine


def _rows(tensor: torch.Tensor, rows: range, unit: int = 1, dim: int = 0) -> torch.Tensor:
    if not hasattr(tensor, "narrow"):   # a pre-quantized checkpoint's bundle (engine/quantization.py)
        raise ValueError(f"a {type(tensor).__name__} weight does not shard yet; serve a pre-quantized checkpoint "
                         "with tensor_parallel_size 1")
    return tensor.narrow(dim, rows.start * unit, len(rows) * unit).clone()


def shard_state_dict(state: dict[str, torch.Tensor], shard: Shard) -> dict[str, torch.Tensor]:
    """One rank's part of a Llama-family checkpoint (transformers' parameter names), cut before
    anything moves to the device. Parameters the split does not name (norms) stay whole."""
    if shard.size == 1:
        return state
    d = shard.head_dim
    out = {}
    for name, tensor in state.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            out[name] = _rows(tensor, shard.heads, d)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias",
                            "self_attn.v_proj.weight", "self_attn.v_proj.bias")):
            out[name] = _rows(tensor, shard.kv_heads, d)
        elif name.endswith("self_attn.o_proj.weight"):
            out[name] = _rows(tensor, shard.heads, d, dim=1)
        elif name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            out[name] = _rows(tensor, shard.ffn_rows)
        elif name.endswith("mlp.down_proj.weight"):
            out[name] = _rows(tensor, shard.ffn_rows, dim=1)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = _rows(tensor, shard.vocab_rows)
        elif name.endswith("self_attn.o_proj.bias") or name.endswith("mlp.down_proj.bias"):
            raise ValueError(f"{name}: a row-parallel bias is not supported; serve this model with tensor_parallel_size 1")
        else:
            out[name] = tensor
    return out


# ---- PD handoff between sizes -------------------------------------------------------------------

@dataclass(frozen=True)
class HeadCopy:
    """One piece of a handoff: KV heads `heads` (of the full model) go from a prefill rank's
    pool, where they start at local head `src_first`, to a decode rank's, at `dst_first`."""
    src_rank: int
    dst_rank: int
    heads: range
    src_first: int
    dst_first: int


def handoff_plan(num_kv_heads: int, prefill_size: int, decode_size: int) -> tuple[HeadCopy, ...]:
    """Which prefill rank writes which KV heads into which decode rank, for sizes dividing the
    KV heads: every head exactly once, each from the rank that computed it to the rank that
    attends over it, so no rank gathers the whole KV."""
    for size in (prefill_size, decode_size):
        if size < 1 or num_kv_heads % size:
            raise ValueError(f"size {size} does not divide num_key_value_heads {num_kv_heads}")
    copies = []
    for src in range(prefill_size):
        mine = split(num_kv_heads, prefill_size, src)
        for dst in range(decode_size):
            theirs = split(num_kv_heads, decode_size, dst)
            lo, hi = max(mine.start, theirs.start), min(mine.stop, theirs.stop)
            if lo < hi:
                copies.append(HeadCopy(src, dst, range(lo, hi), lo - mine.start, lo - theirs.start))
    return tuple(copies)


def copies_from(plan: tuple[HeadCopy, ...], rank: int) -> tuple[HeadCopy, ...]:
    """The pieces a prefill rank writes."""
    return tuple(c for c in plan if c.src_rank == rank)


def slot_pieces(copy: HeadCopy, run: tuple[int, int, int], src_heads: int, dst_heads: int,
                src_block_bytes: int, dst_block_bytes: int, slots: int) -> list[tuple[int, int, int]]:
    """One layer of a run of `run` = (src block, dst block, count) consecutive blocks, as byte
    pieces (src offset, dst offset, length) from each pool's layer start, for the heads of
    `copy`. A block is `slots` slots (K and V of each token), each holding its pool's heads side
    by side: a copy of every head on both sides is the run's one region, a slice of them one
    strided piece per slot."""
    src, dst, count = run
    if len(copy.heads) == src_heads == dst_heads:
        return [(src * src_block_bytes, dst * dst_block_bytes, count * src_block_bytes)]
    head_bytes = src_block_bytes // (slots * src_heads)
    src_slot, dst_slot = src_block_bytes // slots, dst_block_bytes // slots
    first_src = src * src_block_bytes + copy.src_first * head_bytes
    first_dst = dst * dst_block_bytes + copy.dst_first * head_bytes
    length = len(copy.heads) * head_bytes
    return [(first_src + k * src_slot, first_dst + k * dst_slot, length) for k in range(count * slots)]

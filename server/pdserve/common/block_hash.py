"""Content addresses of full KV blocks, shared by the engines' prefix caches and the router.

Block i's hash covers its own tokens and, through its parent's hash, every token before it
(vLLM's scheme), so equal hashes mean equal prefixes. The hash is a real digest (SHA-256 of the
parent's hash and the block's token ids in a fixed byte order, truncated to 63 bits so it fits
the engine RPC's int64), so every process on every node, whatever its Python build, computes
the same hashes for the same tokens. The engines still compare token ids on a hit: a collision
can only cost a routing choice or a cache miss, never wrong KV.
"""
from __future__ import annotations

import hashlib
import struct

ROOT_HASH = 0x9E3779B97F4A7C15 & (2**63 - 1)
_MASK = 2**63 - 1


def next_block_hash(parent: int | None, tokens) -> int:
    """The hash of one block after a block whose hash is parent (None: the first block)."""
    data = struct.pack(f"<q{len(tokens)}i", ROOT_HASH if parent is None else parent, *tokens)
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & _MASK


def block_hashes(token_ids: list[int], block_size: int, limit: int | None = None) -> list[int]:
    """The hashes of the full blocks of token_ids (at most `limit` of them), in order."""
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    out, parent = [], None
    for i in range(n):
        parent = next_block_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out

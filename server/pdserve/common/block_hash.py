"""Content addresses of full KV blocks, shared by the engines' prefix caches and the router.

Block i's hash covers its own tokens and, through its parent's hash, every token before it
(vLLM's scheme), so equal hashes mean equal prefixes. Python's hash of a tuple of ints is the
same in every process (PYTHONHASHSEED randomizes only str and bytes), so a front end computes
the same hashes as the engines it routes to. The engines still compare token ids on a hit:
a collision can only cost a routing choice, never wrong KV.
"""
from __future__ import annotations

ROOT_HASH = 0x9E3779B97F4A7C15 & (2**63 - 1)


def block_hashes(token_ids: list[int], block_size: int, limit: int | None = None) -> list[int]:
    """The hashes of the full blocks of token_ids (at most `limit` of them), in order."""
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    out, parent = [], ROOT_HASH
    for i in range(n):
        parent = hash((parent, *token_ids[i * block_size:(i + 1) * block_size]))
        out.append(parent)
    return out


def next_block_hash(parent: int | None, tokens: list[int]) -> int:
    """The hash of one block after a block whose hash is parent (None: the first block)."""
    return hash((ROOT_HASH if parent is None else parent, *tokens))


# A front end computes prompt hashes with its own tokenizer; they are worth something only if it
# splits text exactly as the engines do. Each engine publishes the fingerprint of its token ids
# for this text (capacity "tokenizer_probe"); a front end whose tokenizer disagrees routes by load.
TOKENIZER_PROBE = "pdserve probe: Hello, wörld! 0123456789 3.14159 <tag> naïve café  tabs\tand\nlines 日本語 🙂 x=1;"


def tokenizer_fingerprint(token_ids: list[int]) -> int:
    return hash(tuple(token_ids)) & (2**53 - 1)    # fits a JSON number exactly

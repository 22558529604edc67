"""One request inside the engine: its tokens, its blocks and its sampling state."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from pdserve.common.block_hash import next_block_hash
from pdserve.common.sampling import SamplingParams, TokenLogprobs

__all__ = ["SamplingParams", "Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    AWAITING_KV = "awaiting_kv"   # DECODE: blocks reserved, a prefill engine computes the prompt's KV
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # How many tokens already have their KV in the cache (computed, found in the prefix cache,
    # or written by a prefill engine).
    num_cached_tokens: int = 0
    # The hashes of the leading blocks of block_table that are full of computed KV (block_manager.py).
    block_hashes: list[int] = field(default_factory=list)
    # The hashes of the prompt's full blocks as the front end computed them for routing (same
    # block size), so the engine thread need not hash the prompt again; empty: none were sent.
    prompt_block_hashes: tuple[int, ...] = ()
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    # Requests asking log-probabilities: the sampler leaves the last sampled token's here, and
    # the prompt's (one per prompt token after the first) gather as prefill computes them.
    new_logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def block_hash(self, i: int, parent: int | None, block_tokens: tuple[int, ...]) -> int:
        """The hash of block i, whose parent block hashes to parent."""
        if i < len(self.prompt_block_hashes):
            return self.prompt_block_hashes[i]
        return next_block_hash(parent, block_tokens)

    def token_ids_between(self, start: int, end: int) -> list[int]:
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        return self.all_token_ids[start:end]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt log-probabilities still to compute (so the prompt is computed here, not taken
        from the prefix cache)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_cached_tokens

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

"""One request inside the engine: its tokens, its blocks and its sampling state."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    AWAITING_KV = "awaiting_kv"   # DECODE: blocks reserved, a prefill engine is writing the prompt's KV
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # How many tokens already have their KV in the cache.
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    # PD: on a DECODE engine, a prefill engine computes the prompt (until its KV arrives);
    # on a PREFILL engine, where the prompt's KV goes and until when it may be written.
    remote_prefill: bool = False
    kv_destination: dict | None = None
    deadline: float = 0.0
    aborted: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

"""Sampling parameters of one request: defined once, with the defaults of Triton's vLLM backend
(vLLM's SamplingParams: 16 tokens, temperature 1.0), and their form on the engine RPC."""
from __future__ import annotations

from dataclasses import dataclass

from pdserve._proto import engine_pb2


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0: all tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    # Streaming only, read by the front end (not sent to the engine): tokens per response after
    # the first; raises the model's `stream_interval`, as vLLM's per-request setting does.
    stream_interval: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_proto(self) -> engine_pb2.SamplingParams:
        return engine_pb2.SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            has_seed=self.seed is not None, seed=self.seed or 0, stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos, min_tokens=self.min_tokens)

    @classmethod
    def from_proto(cls, msg: engine_pb2.SamplingParams) -> "SamplingParams":
        return cls(max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k,
                   seed=msg.seed if msg.has_seed else None, stop=tuple(msg.stop),
                   stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos, min_tokens=msg.min_tokens)

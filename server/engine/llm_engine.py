"""The engine loop's core: requests in, one scheduler step at a time, text pieces out."""
from __future__ import annotations

import time
from dataclasses import dataclass

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import SamplingParams, Sequence


class RequestError(ValueError):
    """A request the engine refuses: the message says what to change."""


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str | None
    first_token_time: float = 0.0


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.runner = ModelRunner(cfg)
        self.tokenizer = self.runner.tokenizer
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, max(cfg.max_num_batched_tokens, self.max_model_len))
        self.sequences: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.first_token_times: dict[str, float] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def add_request(self, request_id: str, prompt: str, params: SamplingParams) -> None:
        if request_id in self.sequences:
            raise RequestError(f"request id '{request_id}' is already running; use a unique id")
        token_ids = self.tokenizer.encode(prompt)
        if not token_ids:
            raise RequestError("the prompt is empty; send at least one token of text in 'text_input'")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}; "
                f"shorten the prompt to at most {self.max_model_len - 1} tokens")
        seq = Sequence(request_id, token_ids, params, arrival_time=time.time())
        try:
            self.scheduler.add(seq)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        self.sequences[request_id] = seq
        self.detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)

    def abort(self, request_id: str) -> bool:
        seq = self.sequences.get(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self._forget(request_id)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        if is_prefill:
            self.prompt_tokens_total += sum(s.num_tokens - s.num_cached_tokens for s in seqs)
        token_ids = self.runner.run(seqs, is_prefill)
        now = time.time()
        outputs = []
        for seq, token_id in zip(seqs, token_ids):
            self.first_token_times.setdefault(seq.request_id, now)
            outputs.append(self._append_token(seq, token_id))
        self.generation_tokens_total += len(seqs)
        return outputs

    def _append_token(self, seq: Sequence, token_id: int) -> RequestOutput:
        seq.output_token_ids.append(token_id)
        params = seq.params
        detok = self.detokenizers[seq.request_id]
        num_out = len(seq.output_token_ids)
        reason = None
        may_stop = num_out >= params.min_tokens
        if may_stop and token_id in params.stop_token_ids:
            reason = "stop"
        elif may_stop and not params.ignore_eos and token_id in self.runner.eos_ids:
            reason = "stop"
        elif detok.add_token(token_id, check_stop=may_stop):
            reason = "stop"
        elif num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            detok.flush()
        out = RequestOutput(
            request_id=seq.request_id, text=detok.take_piece(final=reason is not None), token_ids=[token_id],
            num_input_tokens=seq.num_prompt_tokens, num_output_tokens=num_out, finish_reason=reason,
            first_token_time=self.first_token_times.get(seq.request_id, 0.0))
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._forget(seq.request_id)
        return out

    def _forget(self, request_id: str) -> None:
        self.sequences.pop(request_id, None)
        self.detokenizers.pop(request_id, None)
        self.first_token_times.pop(request_id, None)

"""The engine loop's core: requests in, one scheduler step at a time, text pieces out.

In PD serving the same engine plays either side of the KV handoff: a DECODE engine reserves
blocks for a prompt that a PREFILL engine computes (add_request(remote_prefill=True), then
complete_remote_prefill or fail_remote_prefill); a PREFILL engine computes prompts whose KV it
writes into those blocks through its transport (add_prefill_request) and returns the first token.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.kv_transport import KVTransport
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
    error: str = ""                 # PREFILL: why a handoff failed
    transfer_seconds: float = 0.0   # PREFILL: the KV write of a handoff
    transfer_bytes: int = 0


KV_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class TransferStats:
    count: int = 0
    failures: int = 0
    seconds: float = 0.0
    bytes: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(KV_TRANSFER_BUCKETS))

    def observe(self, seconds: float, nbytes: int) -> None:
        self.count += 1
        self.seconds += seconds
        self.bytes += nbytes
        for i in range(bisect.bisect_left(KV_TRANSFER_BUCKETS, seconds), len(self.buckets)):
            self.buckets[i] += 1


class LLMEngine:
    def __init__(self, cfg: EngineConfig, transport: KVTransport | None = None):
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
        self.transport = transport
        self.transfers = TransferStats()
        if transport is not None:
            transport.register_pool(self.runner.kv_cache)

    def _admit(self, request_id: str, token_ids: list[int], params: SamplingParams) -> Sequence:
        if request_id in self.sequences:
            raise RequestError(f"request id '{request_id}' is already running; use a unique id")
        if not token_ids:
            raise RequestError("the prompt is empty; send at least one token of text in 'text_input'")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}; "
                f"shorten the prompt to at most {self.max_model_len - 1} tokens")
        return Sequence(request_id, token_ids, params, arrival_time=time.time())

    def _enqueue(self, seq: Sequence) -> None:
        try:
            self.scheduler.add(seq)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        self.sequences[seq.request_id] = seq

    def add_request(self, request_id: str, prompt: str, params: SamplingParams, remote_prefill: bool = False) -> list[int]:
        """Queues a request; returns its prompt token ids. With remote_prefill, the blocks are
        reserved at admission (take_reserved) and a prefill engine computes the prompt."""
        seq = self._admit(request_id, self.tokenizer.encode(prompt), params)
        seq.remote_prefill = remote_prefill
        self._enqueue(seq)
        self.detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        return seq.prompt_token_ids

    def add_prefill_request(self, request_id: str, token_ids: list[int], params: SamplingParams,
                            destination: dict, deadline: float) -> None:
        """PREFILL side: compute the prompt, write its KV to destination, return the first token."""
        if self.transport is None:
            raise RequestError("this engine has no KV transport; PREFILL engines need kv_transport (e.g. mooncake)")
        if len(destination.get("block_ids", [])) != -(-len(token_ids) // self.block_manager.block_size):
            raise RequestError(f"the destination has {len(destination.get('block_ids', []))} blocks for "
                               f"{len(token_ids)} prompt tokens; both engines need the same kv_block_size")
        seq = self._admit(request_id, list(token_ids), params)
        seq.kv_destination, seq.deadline = destination, deadline
        self._enqueue(seq)

    def take_reserved(self) -> list[Sequence]:
        """DECODE side: sequences whose blocks were just reserved for a remote prefill."""
        return self.scheduler.take_reserved()

    def complete_remote_prefill(self, request_id: str, first_token: int) -> RequestOutput | None:
        """DECODE side: the prompt's KV is in place; the first token goes out and decoding goes on."""
        seq = self.sequences.get(request_id)
        if seq is None or request_id not in self.scheduler.awaiting_kv:
            return None
        if seq.aborted:
            self.fail_remote_prefill(request_id)
            return None
        self.scheduler.kv_arrived(seq)
        self.runner.sampler.skip_draw(seq, self.runner.vocab_size)  # the prefill engine drew the first token
        self.first_token_times[request_id] = time.time()
        self.generation_tokens_total += 1
        return self._append_token(seq, first_token)

    def fail_remote_prefill(self, request_id: str) -> bool:
        """DECODE side: the handoff failed or ended after an abort: free the reserved blocks."""
        seq = self.sequences.get(request_id)
        if seq is None or request_id not in self.scheduler.awaiting_kv:
            return False
        self.scheduler.release(seq, "abort")
        self._forget(request_id)
        return True

    def abort(self, request_id: str) -> bool:
        seq = self.sequences.get(request_id)
        if seq is None:
            return False
        if request_id in self.scheduler.awaiting_kv:
            # A prefill engine may be writing into the reserved blocks: they are freed only
            # when its answer (or failure) arrives, never reused under a write in flight.
            seq.aborted = True
            return True
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
            if seq.kv_destination is not None:
                outputs.append(self._hand_off(seq, token_id))
                continue
            self.first_token_times.setdefault(seq.request_id, now)
            outputs.append(self._append_token(seq, token_id))
            self.generation_tokens_total += 1
        return outputs

    def _hand_off(self, seq: Sequence, first_token: int) -> RequestOutput:
        """PREFILL side: write the prompt's KV into the decode engine's blocks, then free ours."""
        out = RequestOutput(request_id=seq.request_id, text="", token_ids=[first_token],
                            num_input_tokens=seq.num_prompt_tokens, num_output_tokens=1, finish_reason="prefilled")
        dest = seq.kv_destination
        try:
            if time.time() > seq.deadline:
                raise TimeoutError("the handoff deadline passed before the KV was written; nothing was written")
            start = time.perf_counter()
            out.transfer_bytes = self.transport.write_blocks(dest, seq.block_table, list(dest["block_ids"]))
            out.transfer_seconds = time.perf_counter() - start
            self.transfers.observe(out.transfer_seconds, out.transfer_bytes)
        except Exception as exc:  # the decode side learns of it and frees its blocks
            self.transfers.failures += 1
            out.finish_reason, out.error = "error", f"{type(exc).__name__}: {exc}"
        self.scheduler.finish(seq, out.finish_reason)
        self._forget(seq.request_id)
        return out

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

"""The engine loop's core: token ids in, one scheduler step at a time, text pieces out.

Everything here runs on the engine thread. In PD serving the same engine plays either side
of the KV handoff, and asks its connector (kv_connector.py) what each event means: a DECODE
engine reserves blocks for a prompt a PREFILL engine computes (add_request with a
prefill_address, take_dispatch, on_prefill_answer, expire_handoffs); a PREFILL engine
computes prompts whose KV it writes into those blocks (add_prefill_request).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from pdserve.common.errors import Cause, ServeError
from pdserve.common.sampling import TokenLogprobs
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.detokenizer import IncrementalDetokenizer, text_of_ids
from pdserve.engine.kv_connector import (Action, Decision, DecodeKVConnector, Handoff, PrefillKVConnector,
                                         DEFAULT_GRACE_S, DEFAULT_TIMEOUT_S)
from pdserve.engine.kv_events import KVEventLog
from pdserve.engine.kv_offload import KVTierStats, build_tiers
from pdserve.engine.kv_transport import KVDestination, KVTransport
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine import ranks
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import SamplingParams, Sequence
from pdserve.engine.structured import StructuredOutputs

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()    # the tokens of this output (PREFILL: the first token)
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str | None = None   # "stop", "length", "abort"; PREFILL: "prefilled"
    error: ServeError | None = None    # the request ended with this error
    logprobs: tuple[TokenLogprobs, ...] = ()          # per token of token_ids, when asked
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()   # the first output: prompt tokens after the first

    @property
    def final(self) -> bool:
        return self.error is not None or self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot built on the engine thread, read by the RPC thread as a whole."""
    num_running: int = 0
    num_waiting: int = 0
    num_awaiting_kv: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_preemptions: int = 0
    waiting_prefill_tokens: int = 0
    kv_transfers: int = 0
    kv_transfer_failures: int = 0
    kv_transfer_seconds: float = 0.0
    kv_transfer_bytes: int = 0
    kv_transfer_bucket_counts: tuple[int, ...] = ()
    prefix_cache_queries: int = 0     # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0        # of those, found there
    num_cached_blocks: int = 0
    kv_tiers: tuple[KVTierStats, ...] = ()   # offload tiers under the prefix cache (kv_offload.py)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, transport: KVTransport | None = None,
                 handoff_timeout_s: float = DEFAULT_TIMEOUT_S, handoff_grace_s: float = DEFAULT_GRACE_S, tp=None):
        """tp: the instance's RankGroup (engine/ranks.py) when it spans several devices; this is rank 0."""
        if tp is not None:   # an offload tier would keep rank 0's share of each block only
            tiers = {f.name: 0.0 for f in dataclasses.fields(cfg)
                     if f.name.startswith("kv_offload_") and f.name.endswith("_gb") and getattr(cfg, f.name)}
            if tiers:
                log.warning("KV offload tiers are not implemented with tensor parallelism yet; %s off", ", ".join(tiers))
                cfg = dataclasses.replace(cfg, **tiers)
            if cfg.kv_store not in ("", "none"):
                log.warning("the KV store is not implemented with tensor parallelism yet; kv_store off")
                cfg = dataclasses.replace(cfg, kv_store="")
        self.cfg = cfg
        self.runner = ModelRunner(cfg, tp)
        self.tokenizer = self.runner.tokenizer
        self.text_of_ids = text_of_ids(self.tokenizer)   # every request's detokenizer decodes with it
        self.max_model_len = self.runner.max_model_len
        self.kv_events = KVEventLog()
        self.kv_tiers = build_tiers(cfg, self.runner.kv_cache, self.runner.block_size)
        self.host_tier = self.kv_tiers.tier("host") if self.kv_tiers else None
        self.disk_tier = self.kv_tiers.tier("disk") if self.kv_tiers else None
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size,
                                          cfg.enable_prefix_caching, self.kv_events, self.kv_tiers)
        self.transport = transport
        self.decode_kv = DecodeKVConnector(handoff_timeout_s, handoff_grace_s) if transport else None
        self.prefill_kv = PrefillKVConnector(transport, self.runner.block_size) if transport else None
        # every rank's pool (a tensor-parallel decode instance's destinations name each); (): this one
        self.kv_pools = ()
        if transport is not None and tp is not None:
            self.kv_pools = ranks.share_pool(transport, self.runner, tp)
        elif transport is not None:
            transport.register_pool(self.runner.kv_cache)
        if self.prefill_kv is not None:
            self.runner.layer_push = self.prefill_kv.layer_push
        # Without chunked prefill a whole prompt must fit one step's budget.
        budget = cfg.max_num_batched_tokens if cfg.enable_chunked_prefill else max(cfg.max_num_batched_tokens,
                                                                                   self.max_model_len)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, budget, self.decode_kv,
                                   cfg.enable_chunked_prefill)
        self.sequences: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.structured = StructuredOutputs(self.tokenizer, self.runner.vocab_size, self.runner.eos_ids)
        self.runner.sampler.constrain = self.structured.apply

    # ---- requests in ------------------------------------------------------------------------
    def _admit(self, request_id: str, token_ids: list[int], params: SamplingParams,
               prompt_block_hashes: tuple[int, ...] = ()) -> Sequence:
        if request_id in self.sequences:
            raise ServeError(Cause.INVALID_ARGUMENT, f"request id '{request_id}' is already running; use a unique id")
        if not token_ids:
            raise ServeError(Cause.INVALID_ARGUMENT, "the prompt is empty; send at least one token of text in 'text_input'")
        if len(token_ids) >= self.max_model_len:
            raise ServeError(Cause.INVALID_ARGUMENT,
                             f"the prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}; "
                             f"shorten the prompt to at most {self.max_model_len - 1} tokens")
        if len(self.scheduler.waiting) >= self.cfg.max_queue_len:
            raise ServeError(Cause.OVERLOADED, f"the engine's queue is full ({self.cfg.max_queue_len} waiting requests, "
                                               "parameter max_queue_len); retry later or add instances")
        if min(token_ids) < 0 or max(token_ids) >= self.runner.vocab_size:
            raise ServeError(Cause.INVALID_ARGUMENT, f"the prompt has token ids outside the vocabulary (ids 0 to "
                                                     f"{self.runner.vocab_size - 1}): is the front end's tokenizer "
                                                     "this model's?")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
            outside = [t for t in ids if not 0 <= t < self.runner.vocab_size]
            if outside:
                raise ServeError(Cause.INVALID_ARGUMENT, f"{name} token ids {outside[:5]} are outside the vocabulary "
                                                         f"(ids 0 to {self.runner.vocab_size - 1})")
        seq = Sequence(request_id, list(token_ids), params, prompt_block_hashes=tuple(prompt_block_hashes))
        try:
            self.scheduler.add(seq)
        except ValueError as exc:
            raise ServeError(Cause.INVALID_ARGUMENT, str(exc)) from exc
        self.sequences[request_id] = seq
        return seq

    def add_request(self, request_id: str, token_ids: list[int], params: SamplingParams,
                    prefill_address: str = "", resume_token_ids: list[int] = (),
                    prompt_block_hashes: tuple[int, ...] = ()) -> None:
        """Queues a request. With a prefill_address, a PREFILL engine computes the prompt: its
        blocks are reserved at admission and the handoff is dispatched (take_dispatch). With
        resume_token_ids (migration), generation continues after those tokens, which another
        engine already sent: their KV is recomputed here and only new text goes out."""
        if prefill_address and self.decode_kv is None:
            raise ServeError(Cause.ENGINE_FAILURE,
                             "this engine has no KV transport and cannot take KV from a prefill engine")
        if len(token_ids) + len(resume_token_ids) >= self.max_model_len:
            raise ServeError(Cause.INVALID_ARGUMENT, f"the prompt and the tokens to resume from ("
                                                     f"{len(token_ids) + len(resume_token_ids)}) reach max_model_len")
        if params.prefilled_where_decoded:   # the front end routes these so; a caller that did not is overruled
            prefill_address = ""
        matcher = self.structured.new_matcher(params)
        seq = self._admit(request_id, token_ids, params, prompt_block_hashes)
        self.structured.start(request_id, matcher, resume_token_ids)
        detok = self.detokenizers[request_id] = IncrementalDetokenizer(self.text_of_ids, params.stop)
        if resume_token_ids:
            seq.output_token_ids = list(resume_token_ids)
            for token_id in resume_token_ids:     # the text of these was sent by the former engine
                detok.add_token(token_id, check_stop=False)
                self.runner.sampler.skip_draw(seq)
            detok.take_piece(final=False)
        elif prefill_address:
            self.decode_kv.expect(request_id, prefill_address)

    def add_prefill_request(self, request_id: str, token_ids: list[int], params: SamplingParams,
                            destination: KVDestination, deadline: float) -> None:
        """PREFILL side: compute the prompt, write its KV to destination, return the first token."""
        if self.prefill_kv is None:
            raise ServeError(Cause.ENGINE_FAILURE,
                             "this engine has no KV transport; PREFILL engines need kv_transport (e.g. mooncake)")
        self.prefill_kv.accept(request_id, len(token_ids), destination, deadline)
        try:
            self._admit(request_id, token_ids, params)
        except ServeError:
            self.prefill_kv.forget(request_id)
            raise

    def abort(self, request_id: str) -> None:
        """The client went away: end the request and free its blocks (unless a prefill engine
        may still write into them: then they are freed when it answers)."""
        decision = self.decode_kv.on_abort(request_id) if self.decode_kv else Decision(Action.NONE)
        if decision.action == Action.HOLD:
            self._forget(request_id)
            return
        seq = self.sequences.get(request_id)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
            self._forget(request_id)

    # ---- the DECODE side of the handoff --------------------------------------------------------
    def take_dispatch(self) -> list[tuple[Handoff, Sequence]]:
        """Handoffs whose blocks were just reserved, with their sequences, to send now."""
        if self.decode_kv is None:
            return []
        return [(h, self.scheduler.awaiting_kv[h.request_id]) for h in self.decode_kv.take_dispatch()]

    def on_prefill_answer(self, request_id: str, first_token: int | None, cause: Cause | None = None,
                          message: str = "") -> list[RequestOutput]:
        return self._apply(request_id, self.decode_kv.on_answer(request_id, first_token, cause, message), first_token)

    def expire_handoffs(self) -> list[RequestOutput]:
        if self.decode_kv is None:
            return []
        out = []
        for request_id, decision in self.decode_kv.expire():
            out += self._apply(request_id, decision, None)
        return out

    def _apply(self, request_id: str, decision: Decision, first_token: int | None) -> list[RequestOutput]:
        """Carries out the connector's decision on the request's sequence."""
        seq = self.scheduler.awaiting_kv.get(request_id)
        if seq is None or decision.action == Action.NONE:
            return []
        if decision.action == Action.PREFILL_HERE:
            log.warning("request %s: the prefill engine failed before writing any KV; prefilling it here", request_id)
            self.scheduler.prefill_here(seq)
            return []
        if decision.action == Action.ADMIT:
            self.scheduler.kv_arrived(seq)
            self.runner.sampler.skip_draw(seq)  # the prefill engine drew the first token
            return [self._append_token(seq, first_token)]
        failed = [RequestOutput(request_id, error=decision.error)] if request_id in self.sequences and decision.error else []
        if decision.action in (Action.FAIL, Action.FREE):
            self.scheduler.finish(seq, "abort")
        self._forget(request_id)   # FAIL_HOLD: the client hears now, the blocks wait in awaiting_kv
        return failed

    # ---- steps -----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def keep_ranks_alive(self) -> float | None:
        """Between steps: a tensor-parallel instance's heartbeat to its other ranks, due every
        returned seconds (None: a single device, nothing to keep alive)."""
        if self.runner.tp is None:
            return None
        self.runner.tp.heartbeat()
        return self.runner.tp.heartbeat_s

    @property
    def num_open_handoffs(self) -> int:
        return self.decode_kv.num_open if self.decode_kv else 0

    def next_step_is_full(self) -> bool:
        """Whether the queued work already fills a step: its prompt-token budget or its sequences."""
        s = self.scheduler
        return (s.waiting_prefill_tokens >= self.cfg.max_num_batched_tokens
                or len(s.waiting) + len(s.running) >= self.cfg.max_num_seqs)

    prefilled_tokens = 0   # prompt tokens the last step computed (the worker's prefill speed)

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        self.prefilled_tokens = sum(n for _, n in scheduled.prefills)
        if not scheduled:
            return []
        self.structured.begin_step([seq for seq, _ in scheduled.prefills] + scheduled.decodes)
        sampled = self.runner.run(scheduled)
        self.structured.end_step()
        self.scheduler.computed(scheduled)
        outputs = []
        if self.prefill_kv is not None:
            for request_id, error in self.prefill_kv.end_step():   # the step's KV writes have landed
                seq = self.sequences.get(request_id)
                if seq is not None:
                    self.scheduler.finish(seq, "abort")
                    self._forget(request_id)
                    outputs.append(RequestOutput(request_id, error=error))
        for seq, token_id in sampled:
            if seq.request_id not in self.sequences:
                continue            # its handoff failed in this step
            if self.prefill_kv is not None and self.prefill_kv.sends(seq.request_id):
                outputs.append(self._hand_off(seq, token_id))
            else:
                outputs.append(self._append_token(seq, token_id))
        return outputs

    def fail_all(self, error: ServeError) -> list[RequestOutput]:
        """A step failed: every request the engine holds ends with the error."""
        out = []
        for request_id in list(self.sequences):
            self.abort(request_id)
            out.append(RequestOutput(request_id, error=error))
        return out

    def _hand_off(self, seq: Sequence, first_token: int) -> RequestOutput:
        """PREFILL side: the prompt's KV is in the decode engine's blocks; ours are let go
        (their full blocks stay in the prefix cache)."""
        self.prefill_kv.finish(seq.request_id)
        self.scheduler.finish(seq, "prefilled")
        self._forget(seq.request_id)
        return RequestOutput(seq.request_id, token_ids=(first_token,), num_input_tokens=seq.num_prompt_tokens,
                             num_output_tokens=1, finish_reason="prefilled")

    def _append_token(self, seq: Sequence, token_id: int) -> RequestOutput:
        seq.output_token_ids.append(token_id)
        params = seq.params
        detok = self.detokenizers[seq.request_id]
        num_out = len(seq.output_token_ids)
        reason = None
        may_stop = num_out >= params.min_tokens
        grammar_ended = self.structured.accept(seq.request_id, token_id)
        if may_stop and token_id in params.stop_token_ids:
            reason = "stop"
        elif may_stop and not params.ignore_eos and token_id in self.runner.eos_ids:
            reason = "stop"
        elif detok.add_token(token_id, check_stop=may_stop):
            reason = "stop"
        elif num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is None and grammar_ended:
            reason = "stop"
        if reason is not None:
            detok.flush()
        logprobs, seq.new_logprobs = (seq.new_logprobs,) if seq.new_logprobs else (), None
        prompt_logprobs = tuple(seq.prompt_logprobs) if num_out == 1 and params.prompt_logprobs is not None else ()
        out = RequestOutput(
            seq.request_id, text=detok.take_piece(final=reason is not None), token_ids=(token_id,),
            num_input_tokens=seq.num_prompt_tokens, num_output_tokens=num_out, finish_reason=reason,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._forget(seq.request_id)
        return out

    def _forget(self, request_id: str) -> None:
        self.sequences.pop(request_id, None)
        self.detokenizers.pop(request_id, None)
        self.structured.forget(request_id)
        if self.prefill_kv is not None:
            self.prefill_kv.forget(request_id)

    # ---- figures -----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s, t = self.scheduler, (self.prefill_kv.stats if self.prefill_kv else None)
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_awaiting_kv=len(s.awaiting_kv),
            num_free_blocks=self.block_manager.num_free_blocks, num_total_blocks=self.block_manager.num_blocks,
            num_preemptions=s.num_preemptions, waiting_prefill_tokens=s.waiting_prefill_tokens,
            kv_transfers=t.count if t else 0, kv_transfer_failures=t.failures if t else 0,
            kv_transfer_seconds=t.seconds if t else 0.0, kv_transfer_bytes=t.bytes if t else 0,
            kv_transfer_bucket_counts=tuple(t.buckets) if t else (),
            prefix_cache_queries=self.block_manager.query_tokens, prefix_cache_hits=self.block_manager.hit_tokens,
            num_cached_blocks=self.block_manager.num_cached_blocks,
            kv_tiers=self.tier_stats())

    def tier_stats(self) -> tuple[KVTierStats, ...]:
        """The offload tiers' figures now (any thread: each tier guards what its writer updates)."""
        return self.kv_tiers.stats() if self.kv_tiers else ()

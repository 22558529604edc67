"""Continuous batching: which sequences compute which tokens in the next step.

With chunked prefill (the default) a step is one token budget (max_num_batched_tokens) shared
the way vLLM shares it: first every running decode (one token each), then prompts in progress,
then newly admitted prompts, each taking as many of its uncomputed tokens as the budget has
left. A long prompt is so computed in pieces across steps while the running streams keep
producing a token every step. Without it, a step is either a prefill of whole prompts or a
decode of every running sequence (prefill first).

Admission allocates blocks for all of a prompt's tokens at once, reusing its cached prefix
(block_manager.py). A sequence whose prompt a prefill engine computes (PD; the
DecodeKVConnector says which) is admitted like any other, but only reserves its blocks and
waits outside the steps, in `awaiting_kv`, until the connector admits it (kv_arrived) or lets
its blocks go (release). When the pool runs out of blocks, the most recently admitted sequence
is preempted: its blocks are let go and it goes back to the head of the queue, to be recomputed
(prompt plus what it generated so far) later, from its cached prefix where it is still cached.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager, blocks_needed
from pdserve.engine.kv_connector import DecodeKVConnector
from pdserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step: prompt pieces (sequence, tokens to compute) and decodes (one token each)."""
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 kv_connector: DecodeKVConnector | None = None, enable_chunked_prefill: bool = True):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.kv_connector = kv_connector
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # in admission order
        self.awaiting_kv: dict[str, Sequence] = {}
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if blocks_needed(seq.num_tokens + 1, self.block_manager.block_size) > self.block_manager.num_blocks:
            raise ValueError(
                f"the request needs {blocks_needed(seq.num_tokens + 1, self.block_manager.block_size)} KV blocks "
                f"but the pool has {self.block_manager.num_blocks}; shorten the prompt or raise kv_cache_blocks")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def waiting_prefill_tokens(self) -> int:
        """Prompt tokens still to compute: queued prompts and prompts in progress."""
        return (sum(seq.num_uncomputed_tokens for seq in self.waiting)
                + sum(seq.num_uncomputed_tokens for seq in self.running if seq.num_uncomputed_tokens > 1))

    def _remote(self, seq: Sequence) -> bool:
        return self.kv_connector is not None and self.kv_connector.awaits_remote_kv(seq.request_id)

    def _admit_one(self, whole_prompt_budget: int | None) -> Sequence | None:
        """Allocates the head of the queue; None when it must wait (no room, or it does not fit)."""
        seq = self.waiting[0]
        remote = self._remote(seq)
        if whole_prompt_budget is not None and not remote and seq.num_tokens > whole_prompt_budget:
            return None     # whole-prompt steps: the next step takes it
        if not self.block_manager.allocate(seq):
            return None
        self.waiting.popleft()
        if remote:
            seq.status = SequenceStatus.AWAITING_KV
            self.awaiting_kv[seq.request_id] = seq
            self.kv_connector.reserved(seq.request_id, seq.block_table, seq.num_cached_tokens,
                                      self.block_manager.block_size)
        else:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return seq

    def schedule(self) -> SchedulerOutput:
        if self.enable_chunked_prefill:
            return self._schedule_chunked()
        return self._schedule_whole()

    def _schedule_chunked(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preemptions = self.num_preemptions
        # 1. running decodes, one token each
        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING or not self._make_room(seq):
                continue      # preempted (to make room for an earlier sequence, or itself)
            out.decodes.append(seq)
            budget -= 1
        # 2. prompts in progress (their blocks are all allocated)
        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            out.prefills.append((seq, n))
            budget -= n
        # 3. new prompts (none in a step that had to preempt: the pool is full)
        while self.waiting and budget > 0 and self.num_preemptions == preemptions and len(self.running) + len(self.awaiting_kv) < self.max_num_seqs:
            seq = self._admit_one(None)
            if seq is None:
                break
            if seq.status == SequenceStatus.RUNNING:
                n = min(seq.num_uncomputed_tokens, budget)
                out.prefills.append((seq, n))
                budget -= n
        return out

    def _schedule_whole(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = max(self.max_num_batched_tokens, 1)
        while self.waiting and len(self.running) + len(self.awaiting_kv) < self.max_num_seqs:
            # the first prompt of a step always fits (the step then is that prompt alone)
            seq = self._admit_one(budget if out.prefills else None)
            if seq is None:
                break
            if seq.status == SequenceStatus.RUNNING:
                out.prefills.append((seq, seq.num_uncomputed_tokens))
                budget -= seq.num_uncomputed_tokens
        if out.prefills:
            return out
        for seq in list(self.running):
            if seq.status == SequenceStatus.RUNNING and self._make_room(seq):
                out.decodes.append(seq)
        return out

    def _make_room(self, seq: Sequence) -> bool:
        """Gives a decoding sequence a slot for its next token, preempting the most recently
        admitted sequences (possibly itself) while the pool is full. False: it was preempted."""
        while not self.block_manager.can_append(seq):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.block_manager.append_slot(seq)
        return True

    def computed(self, out: SchedulerOutput) -> None:
        """After a step: the scheduled tokens' KV is in the pool; full blocks become shareable."""
        for seq, n in out.prefills:
            seq.num_cached_tokens += n
            self.block_manager.commit(seq)
        for seq in out.decodes:
            seq.num_cached_tokens += 1
            self.block_manager.commit(seq)

    def kv_arrived(self, seq: Sequence) -> None:
        """The prompt's KV is in the reserved blocks: the sequence decodes from now on.
        Should it be preempted later, it is recomputed locally like any other."""
        del self.awaiting_kv[seq.request_id]
        seq.num_cached_tokens = seq.num_tokens
        self.block_manager.commit(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def prefill_here(self, seq: Sequence) -> None:
        """A handoff that failed without writing: the reserved blocks go back and the sequence
        waits, at the head of the queue, to be prefilled by this engine."""
        del self.awaiting_kv[seq.request_id]
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence wherever it is (running, waiting, awaiting KV) and frees its blocks."""
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.awaiting_kv.pop(seq.request_id, None)
        self.block_manager.free(seq)

"""Continuous batching: every step admits waiting sequences or decodes the running ones.

A step is either a prefill of newly admitted sequences (within max_num_seqs and the token
budget) or a decode of every running sequence. A sequence whose prompt a prefill engine
computes (PD; the DecodeKVConnector says which) is admitted like any other, but only reserves
its blocks and waits outside the steps, in `awaiting_kv`, until the connector admits it
(kv_arrived) or lets its blocks go (release). When the pool runs out of blocks, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the head of
the queue, to be recomputed (prompt plus what it generated so far) later.
"""
from __future__ import annotations

from collections import deque

from pdserve.engine.block_manager import BlockManager, blocks_needed
from pdserve.engine.kv_connector import DecodeKVConnector
from pdserve.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 kv_connector: DecodeKVConnector | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_connector = kv_connector
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
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
        return sum(seq.num_tokens for seq in self.waiting)

    def _remote(self, seq: Sequence) -> bool:
        return self.kv_connector is not None and self.kv_connector.awaits_remote_kv(seq.request_id)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns the sequences of the next step and whether it is a prefill step."""
        prefills: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(self.awaiting_kv) < self.max_num_seqs:
            seq = self.waiting[0]
            remote = self._remote(seq)
            if (not remote and prefills and seq.num_tokens > budget) or not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            if remote:
                seq.status = SequenceStatus.AWAITING_KV
                self.awaiting_kv[seq.request_id] = seq
                self.kv_connector.reserved(seq.request_id, seq.block_table)
                continue
            seq.status = SequenceStatus.RUNNING
            budget -= seq.num_tokens
            self.running.append(seq)
            prefills.append(seq)
        if prefills:
            return prefills, True

        decodes: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not self.block_manager.can_append(seq):
                if queue:
                    self.preempt(queue.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.append_slot(seq)
                decodes.append(seq)
        self.running = list(decodes)  # everything else was preempted; a copy, as finish() edits it
        return decodes, False

    def kv_arrived(self, seq: Sequence) -> None:
        """The prompt's KV is in the reserved blocks: the sequence decodes from now on.
        Should it be preempted later, it is recomputed locally like any other."""
        del self.awaiting_kv[seq.request_id]
        seq.num_cached_tokens = seq.num_tokens
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

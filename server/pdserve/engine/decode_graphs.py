"""CUDA graphs of the decode forward (a GPU engine's decode-only steps).

A decode step of a small model launches a few hundred short kernels (every layer's linears,
norms, rotary, attention, then the LM head); Python launching them one by one takes longer than
the GPU takes to run them. A graph captured once per batch size replays the whole forward in one
call. Sizes follow vLLM's ladder (1, 2, 4, then multiples of 8 up to max_num_seqs); a step runs
the smallest graph that holds its batch and eagerly when none does (a step with prompt pieces, a
batch past the largest graph).

A graph reads fixed buffers: a step copies its batch into them and fills the rest of its size
with padding rows, which write their KV into a scratch block no sequence owns and attend over
that block alone. The logits come back in the graph's own output tensor, valid until the next
replay (the sampler reads them at once).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from pdserve.engine.attention import AttentionMetadata

log = logging.getLogger(__name__)


def graph_batch_sizes(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to max_num_seqs (which is the last size, a multiple of 8 or not)."""
    sizes = [s for s in (1, 2, 4) if s < max_seqs] + list(range(8, max_seqs, 8))
    return sizes + [max_seqs]


class CudaGraph:
    """One captured forward (torch.cuda.CUDAGraph); graphs of one engine share a memory pool."""

    def __init__(self, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = forward()
        return out

    def replay(self) -> None:
        self.graph.replay()

    def memory_pool(self):
        return self.graph.pool()


class DecodeGraphs:
    """The graphs of one engine's decode forward, captured by capture() after the engine's
    warm-up and checked by check(), and run() for each decode-only step."""

    def __init__(self, forward, device: torch.device, max_seqs: int, block_size: int, max_blocks: int,
                 scratch_block: int, planner=None, graph_type=CudaGraph):
        """forward(input_ids, positions, meta) -> logits; planner: the kernel set's paged decode
        (kernels.paged_decode), planned on the host before each replay, or None."""
        self.forward, self.block_size = forward, block_size
        self.scratch_block, self.planner, self.graph_type = scratch_block, planner, graph_type
        self.sizes = graph_batch_sizes(max_seqs)
        n = self.sizes[-1]
        # rows: input id, position, KV slot's block, slot's offset, context length; the block tables
        self.rows = torch.zeros((5, n), dtype=torch.long, device=device)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.long, device=device)
        self.last = torch.arange(n, device=device)
        pinned = device.type == "cuda"
        self.host_rows = torch.zeros((5, n), dtype=torch.long, pin_memory=pinned)
        self.host_tables = torch.full((n, max_blocks), scratch_block, dtype=torch.long, pin_memory=pinned)
        self.graphs: dict[int, object] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.plans: dict[int, object] = {}

    def _fill(self, seqs, size: int) -> None:
        """The step's rows into the fixed buffers, padding rows up to size: one tensor built from
        lists and one copy each (a table's columns past the batch's widest are left stale: every
        kernel stops at a row's context length)."""
        bs, scratch, pad = self.block_size, self.scratch_block, size - len(seqs)
        positions = [seq.num_tokens - 1 for seq in seqs]
        lens = [p + 1 for p in positions] + [1] * pad
        self.host_rows[:, :size] = torch.tensor([
            [seq.last_token_id for seq in seqs] + [0] * pad,
            positions + [0] * pad,
            [seq.block_table[p // bs] for seq, p in zip(seqs, positions)] + [scratch] * pad,
            [p % bs for p in positions] + [0] * pad,
            lens])
        tables = [seq.block_table for seq in seqs] + [[scratch]] * pad
        width = max(map(len, tables))
        self.host_tables[:size, :width] = torch.tensor([t + [scratch] * (width - len(t)) for t in tables])
        self.rows[:, :size].copy_(self.host_rows[:, :size], non_blocking=True)
        self.tables[:size, :width].copy_(self.host_tables[:size, :width], non_blocking=True)
        if self.planner is not None:
            self.plans[size] = self.planner.plan(tables, lens, graph_size=size)

    def _meta(self, size: int) -> AttentionMetadata:
        rows = self.rows[:, :size]
        return AttentionMetadata(slot_blocks=rows[2], slot_offsets=rows[3], last_token_indices=self.last[:size],
                                 block_tables=self.tables[:size], context_lens=rows[4],
                                 decode_plan=self.plans.get(size))

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, so the smaller graphs reuse its memory pool. Each size runs once eagerly
        before its capture (lazy initialisations, library workspaces)."""
        started, pool = time.monotonic(), None
        for size in reversed(self.sizes):
            self._fill([], size)
            rows, meta = self.rows[:, :size], self._meta(size)
            self.forward(rows[0], rows[1], meta)
            graph = self.graph_type(pool)
            self.outputs[size] = graph.capture(lambda rows=rows, meta=meta: self.forward(rows[0], rows[1], meta))
            self.graphs[size] = graph
            pool = graph.memory_pool()
        log.info("decode graphs: %d batch sizes (%s) captured in %.1f s", len(self.sizes),
                 ", ".join(map(str, self.sizes)), time.monotonic() - started)

    @torch.inference_mode()
    def check(self) -> None:
        """Raises unless a replay of the smallest and the largest graph gives the eager forward's
        logits over the same (padding) rows: a capture that went wrong is found at load."""
        for size in {self.sizes[0], self.sizes[-1]}:
            self._fill([], size)
            rows, meta = self.rows[:, :size], self._meta(size)
            expected = self.forward(rows[0], rows[1], meta).float()
            self.graphs[size].replay()
            error = (self.outputs[size].float() - expected).abs().max().item()
            if not error <= 1e-2 * expected.abs().max().item() + 1e-3:
                raise RuntimeError(f"the graph of {size} rows differs from the eager forward by {error}")

    def size_for(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    @torch.inference_mode()
    def run(self, seqs) -> torch.Tensor | None:
        """The logits of a decode-only step's sequences, [len(seqs), vocab], from a replay; None
        when the batch is larger than every graph (the caller runs it eagerly)."""
        size = self.size_for(len(seqs))
        if size is None:
            return None
        self._fill(seqs, size)
        self.graphs[size].replay()
        return self.outputs[size][:len(seqs)]

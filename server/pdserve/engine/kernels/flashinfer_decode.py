"""FlashInfer's paged decode attention over pdserve's KV pool (GPU engines where the
flashinfer-python package is installed; kernels/cuda.py falls back to SDPA where it is not).

The pool stores one layer of every block as [blocks, 2, block_size, kv_heads, dim]
(model_runner.py keeps it layer-major): FlashInfer's NHD paged layout, read in place. A step's
decode part is planned once on the host (the pages of each sequence and how full its last one
is); every layer then runs the planned kernel, reading only the pages a sequence holds. CUDA
graphs (engine/decode_graphs.py) get one wrapper per batch size with its page lists in fixed
buffers, which plan() refills before each replay.
"""
from __future__ import annotations

import torch

WORKSPACE_BYTES = 128 << 20   # FlashInfer's float workspace (split-KV partial results); its examples' size


def page_lists(block_lists: list[list[int]], context_lens: list[int], block_size: int):
    """FlashInfer's CSR page table of a batch: (indptr, indices, last_page_len), lists of ints.
    Sequence i reads pages indices[indptr[i]:indptr[i + 1]], the last of them filled to
    last_page_len[i] (1 .. block_size)."""
    indptr, indices, last = [0], [], []
    for blocks, n in zip(block_lists, context_lens):
        pages = (n + block_size - 1) // block_size
        if len(blocks) < pages:
            raise ValueError(f"a context of {n} tokens needs {pages} blocks, the table has {len(blocks)}")
        indices += blocks[:pages]
        indptr.append(len(indices))
        last.append(n - (pages - 1) * block_size)
    return indptr, indices, last


class FlashInferDecode:
    """kernels.paged_decode() on a GPU: plan() per step, then run() per layer (via meta.decode_plan)."""

    def __init__(self, flashinfer, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, max_blocks: int):
        self.flashinfer, self.device, self.dtype = flashinfer, device, dtype
        self.shape = (num_heads, num_kv_heads, head_dim, block_size)
        self.max_blocks = max_blocks
        # tensor cores for wide query groups (Qwen2.5-0.5B's 7 per KV head): vLLM's rule
        self.tensor_cores = num_heads // num_kv_heads > 4
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.eager = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                  use_tensor_cores=self.tensor_cores)
        self.graph_wrappers: dict[int, object] = {}

    def _wrapper(self, graph_size: int | None):
        """The eager wrapper, or the one whose buffers a graph of graph_size rows captured."""
        if graph_size is None:
            return self.eager
        wrapper = self.graph_wrappers.get(graph_size)
        if wrapper is None:
            i32 = dict(dtype=torch.int32, device=self.device)
            wrapper = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(graph_size + 1, **i32),
                paged_kv_indices_buffer=torch.zeros(graph_size * self.max_blocks, **i32),
                paged_kv_last_page_len_buffer=torch.zeros(graph_size, **i32))
            self.graph_wrappers[graph_size] = wrapper
        return wrapper

    def plan(self, block_lists: list[list[int]], context_lens: list[int], graph_size: int | None = None):
        """Plans a batch's decode attention; returns the wrapper whose run(q, pool_layer) computes it."""
        heads, kv_heads, head_dim, block_size = self.shape
        indptr, indices, last = (torch.tensor(x, dtype=torch.int32)
                                 for x in page_lists(block_lists, context_lens, block_size))
        wrapper = self._wrapper(graph_size)
        wrapper.plan(indptr, indices, last, heads, kv_heads, head_dim, block_size,
                     pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.dtype)
        return wrapper

    def check(self, reference) -> None:
        """Raises unless the planned kernel matches reference(q, pool, layer, meta) (the SDPA
        path) on a small batch: a build that fails or computes wrong is found at load."""
        from pdserve.engine.attention import AttentionMetadata

        heads, kv_heads, head_dim, block_size = self.shape
        gen = torch.Generator(device=self.device).manual_seed(0)
        pool = torch.randn((4, 1, 2, block_size, kv_heads, head_dim), generator=gen, device=self.device).to(self.dtype)
        q = torch.randn((2, heads, head_dim), generator=gen, device=self.device).to(self.dtype)
        tables, lens = [[3, 1], [2]], [block_size + 3, 5]
        meta = AttentionMetadata(slot_blocks=None, slot_offsets=None, last_token_indices=None,
                                 block_tables=torch.tensor([[3, 1], [2, 0]], device=self.device),
                                 context_lens=torch.tensor(lens, device=self.device))
        expected = reference(q, pool, 0, meta).float()
        got = self.plan(tables, lens).run(q, pool[:, 0]).float()
        error = (got - expected).abs().max().item()
        if not error <= 2e-2:
            raise RuntimeError(f"FlashInfer's decode differs from SDPA's by {error} on a test batch")

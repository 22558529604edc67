"""Loads a transformers checkpoint onto the device, owns the KV pool, and runs one batch."""
from __future__ import annotations

import glob
import json
import logging
import os
import time

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from pdserve.engine.attention import AttentionMetadata, Progress
from pdserve.engine.block_manager import blocks_needed
from pdserve.engine.config import EngineConfig
from pdserve.engine.decode_graphs import CudaGraph, DecodeGraphs
from pdserve.common.devices import parse_device
from pdserve.engine.devices import free_memory_bytes, open_device
from pdserve.engine.kernels import kernels_for
from pdserve.engine.models import build_model
from pdserve.engine import quantization
from pdserve.engine.parallel import rank_config, shard_of, shard_state_dict
from pdserve.engine.ranks import parallelize, step_payload
from pdserve.engine.sampler import Sampler
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.sequence import Sequence

log = logging.getLogger(__name__)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def eos_token_ids(path: str, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            sources.append(json.load(f).get("eos_token_id"))
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the hardware computes it natively (GPUs, NPUs, CPUs with
    avx512_bf16, AMX or avx_ne_convert), float32 otherwise. Any other name is taken as is."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        chosen, why = (torch.bfloat16, "GPU with bf16") if torch.cuda.is_bf16_supported() else (torch.float32, "GPU without bf16")
    elif device.type == "npu":
        chosen, why = torch.bfloat16, "NPU"
    else:
        from pdserve.engine.kernels.cpu import native_bf16
        chosen, why = ((torch.bfloat16, "CPU with native bf16 (avx512_bf16 / AMX / avx_ne_convert)") if native_bf16()
                       else (torch.float32, "CPU without native bf16 (no avx512_bf16, AMX or avx_ne_convert)"))
    log.info("dtype auto: %s (%s)", str(chosen).removeprefix("torch."), why)
    return chosen


# A prefill of many prompts runs as forwards of whole pieces whose widest activation (the MLP's
# gate_up output) stays within about this much: the GEMMs slow down once it no longer stays in
# cache. Groups are a power of two of tokens between the bounds below.
PREFILL_GROUP_BYTES = 12 << 20
PREFILL_GROUP_TOKENS_MIN, PREFILL_GROUP_TOKENS_MAX = 512, 4096


def prefill_group_tokens(config, dtype: torch.dtype) -> int:
    """The prefill group's size for a model: 512 tokens at Qwen2.5-0.5B's width in bf16, 2048 at
    the demo's (bench/RESULTS.md)."""
    width = 2 * (getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
    fits = PREFILL_GROUP_BYTES // (width * torch.finfo(dtype).bits // 8)
    tokens = PREFILL_GROUP_TOKENS_MIN
    while tokens * 2 <= min(fits, PREFILL_GROUP_TOKENS_MAX):
        tokens *= 2
    return tokens


# The largest KV gather (K and V of one layer) a decode graph may hold on the SDPA path
GRAPH_GATHER_BYTES_MAX = 1 << 30


class ModelRunner:
    def __init__(self, cfg: EngineConfig, tp=None):
        self.cfg = cfg
        self.tp = tp    # the instance's RankGroup (engine/ranks.py) when it spans several devices
        self.device = open_device(parse_device(cfg.device))
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.hf_config = AutoConfig.from_pretrained(cfg.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
        state = load_state_dict(cfg.model_path)
        self.quant = quantization.plan(self.hf_config, cfg.quantization, self.device)
        state = self.quant.bundle(state)   # a compressed checkpoint's tensors, one QuantizedWeight per linear
        if "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        shard = shard_of(tp.rank, tp.size, self.hf_config) if tp is not None else None
        if shard is not None:   # this rank's share only, cut before anything moves to the device
            state = shard_state_dict(state, shard)
        # the config of the model this process holds: a rank's share of heads, rows and vocabulary
        self.model_config = rank_config(self.hf_config, shard) if shard else self.hf_config
        self.model = build_model(self.model_config, state.keys())
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights in {cfg.model_path} do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.model.to(device=self.device, dtype=self.dtype).eval()
        log.info("%s", quantization.attach(self.model, self.quant, self.device))
        self.kernels = kernels_for(self.device, self.dtype)
        self.model.prepare(self.kernels)
        if shard is not None:
            parallelize(self.model, self.hf_config, shard, tp)
        log.info("%s", self.kernels.describe())
        self.eos_ids = eos_token_ids(cfg.model_path, self.hf_config, self.tokenizer)
        self.max_model_len = cfg.max_model_len or self.hf_config.max_position_embeddings
        self.block_size = cfg.kv_block_size
        self.max_blocks = blocks_needed(self.max_model_len, self.block_size)   # the widest block table
        self.decode_planner = self._paged_decode()
        self.graphs_wanted = self._graphs_wanted()
        self.kv_cache = self._allocate_kv_cache()
        # the block manager's blocks; a pool with graphs holds one more, the padding rows' scratch
        self.num_blocks = self.kv_cache.shape[0] - self.graphs_wanted
        self.sampler = Sampler(self.device, cfg.seed, self.kernels.argmax)
        # PREFILL engines: builds, per forward, what to push after each layer (kv_connector.py)
        self.layer_push = None
        self.progress = Progress()   # the last layer a forward finished, for the stall watchdog
        self.vocab_size = self.model.vocab_size
        self.prefill_group_tokens = prefill_group_tokens(self.model_config, self.dtype)
        self._warm_up()
        self.decode_graphs = None
        if self.graphs_wanted:
            graphs = self.make_decode_graphs(CudaGraph)
            try:
                graphs.capture()
                graphs.check()
                self.decode_graphs = graphs
            except Exception as exc:   # an op that cannot be captured, memory: the engine runs eagerly
                log.warning("decode graphs off, every step runs eagerly: %s", exc)

    def _warm_up(self) -> None:
        """One tiny prefill and decode at load (before READY), so the first request does not pay
        for kernel builds, oneDNN primitive creation or first-call allocations. It writes two
        slots of block 0, which the block manager has not handed out yet."""
        blocks = self._tensor([0, 0])
        offsets = self._tensor([0, 1])
        with torch.inference_mode():
            meta = AttentionMetadata(slot_blocks=blocks, slot_offsets=offsets,
                                     last_token_indices=self._tensor([1]), prefill_bounds=[(0, 2)],
                                     prefill_cached=[0], prefill_block_tables=[None])
            self.model(self._tensor([0, 0]), self._tensor([0, 1]), self.kv_cache, meta)
            meta = AttentionMetadata(slot_blocks=blocks[:1], slot_offsets=self._tensor([2]),
                                     last_token_indices=self._tensor([0]), block_tables=self._tensor([[0]]),
                                     context_lens=self._tensor([3]))
            self.model(self._tensor([0]), self._tensor([2]), self.kv_cache, meta)

    def _paged_decode(self):
        """The kernel set's planned decode attention (FlashInfer's on GPUs), for models whose pool
        is per-head K and V, on one device (a follower rank gets no plan); None where there is none."""
        if hasattr(self.model, "kv_block_shape") or self.tp is not None:
            return None
        _, _, _, heads, head_dim = self._kv_block_shape()
        return self.kernels.paged_decode(self.model_config.num_attention_heads, heads, head_dim,
                                         self.block_size, self.max_blocks)

    def _graphs_wanted(self) -> bool:
        """Decode-only steps replay CUDA graphs (decode_graphs.py) on GPUs, unless enforce_eager,
        for models whose decode forward is all device work, on one device. Without a paged decode
        kernel the SDPA path gathers every graph row's table, max_model_len wide: only while that
        stays small."""
        if (self.device.type != "cuda" or self.cfg.enforce_eager or self.tp is not None
                or not getattr(self.model, "decode_graphs", False)):
            return False
        if self.decode_planner is None:
            gather = self.cfg.max_num_seqs * self.max_blocks * self.block_bytes // self.model_config.num_hidden_layers
            if gather > GRAPH_GATHER_BYTES_MAX:
                log.info("decode graphs off: without a paged decode kernel each would gather %.1f GiB of KV a layer "
                         "(max_num_seqs x max_model_len); pip install flashinfer-python", gather / 2**30)
                return False
        return True

    def make_decode_graphs(self, graph_type) -> DecodeGraphs:
        """The decode forward's graphs over this runner's pool (not yet captured); the last pool
        block is their scratch."""
        def forward(input_ids, positions, meta):
            return self.model.logits(self.model.last_hidden(input_ids, positions, self.kv_cache, meta))
        return DecodeGraphs(forward, self.device, self.cfg.max_num_seqs, self.block_size, self.max_blocks,
                            scratch_block=self.kv_cache.shape[0] - 1, planner=self.decode_planner,
                            graph_type=graph_type)

    # ---- the KV pool -------------------------------------------------------------------
    def _kv_block_shape(self) -> tuple[int, ...]:
        if hasattr(self.model, "kv_block_shape"):   # a pool of other rows than per-head K and V (MLA's latents)
            return self.model.kv_block_shape(self.block_size)
        c = self.model_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return (c.num_hidden_layers, 2, self.block_size, kv_heads, head_dim)

    @property
    def block_bytes(self) -> int:
        """One block's KV, all layers."""
        n = 1
        for d in self._kv_block_shape():
            n *= d
        return n * torch.finfo(self.dtype).bits // 8

    def _allocate_kv_cache(self) -> torch.Tensor:
        useful = self.cfg.max_num_seqs * blocks_needed(self.max_model_len, self.block_size)
        if self.cfg.kv_cache_blocks:
            num_blocks = self.cfg.kv_cache_blocks
        else:
            fraction = self.cfg.kv_cache_memory_fraction or (0.1 if self.device.type == "cpu" else 0.9)
            num_blocks = min(useful, int(free_memory_bytes(self.device) * fraction) // self.block_bytes)
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache; lower max_num_seqs or set kv_cache_blocks")
        if self.tp is not None:   # every rank's pool must hold the block ids rank 0 hands out
            num_blocks = self.tp.agree_min(num_blocks, self.device)
        scratch = 1 if self.graphs_wanted else 0
        log.info("KV pool: %d blocks of %d tokens, %d bytes per token (%.1f MiB)", num_blocks, self.block_size,
                 self.block_bytes // self.block_size, num_blocks * self.block_bytes / 2**20)
        # Stored layer-major, [layers, blocks, 2, block_size, kv_heads, dim], so one layer of a run
        # of consecutive blocks is one contiguous region (a KV transport pushes it in one piece
        # as soon as the layer is computed); seen block-major, [blocks, layers, ...] (attention.py).
        # torch.empty: on CPU, pages are committed only as blocks are first written.
        layers, *rest = self._kv_block_shape()
        storage = torch.empty((layers, num_blocks + scratch, *rest), dtype=self.dtype, device=self.device)
        return storage.transpose(0, 1)

    # ---- one step --------------------------------------------------------------------------
    def _prepare(self, prefills: list[tuple[Sequence, int]], decodes: list[Sequence]):
        """The flat batch of a step: every prompt piece's tokens, then one token per decode."""
        bs = self.block_size
        input_ids, positions, slot_blocks, slot_offsets, last, sampled = [], [], [], [], [], []
        bounds, cached, tables = [], [], []
        scored, scored_rows = [], []   # prompt log-probabilities: (seq, position) and its row
        for seq, n in prefills:
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + n
            cached.append(start)
            tables.append(self._tensor(seq.block_table) if start else None)
            begin = len(input_ids)
            input_ids += seq.token_ids_between(start, end)
            positions += range(start, end)
            table = seq.block_table
            slot_blocks += [table[p // bs] for p in range(start, end)]
            slot_offsets += [p % bs for p in range(start, end)]
            bounds.append((begin, len(input_ids)))
            if seq.wants_prompt_logprobs:   # row p predicts prompt token p + 1
                done = len(seq.prompt_logprobs)
                positions_scored = range(max(start, done), min(end, seq.num_prompt_tokens - 1))
                scored += [(seq, p) for p in positions_scored]
                scored_rows += [begin + p - start for p in positions_scored]
            if end == seq.num_tokens:       # the prompt's last piece: its next token is sampled
                last.append(len(input_ids) - 1)
                sampled.append(seq)
        block_tables = context_lens = decode_plan = None
        if decodes:
            for seq in decodes:
                p = seq.num_tokens - 1
                last.append(len(input_ids))
                input_ids.append(seq.last_token_id)
                positions.append(p)
                slot_blocks.append(seq.block_table[p // bs])
                slot_offsets.append(p % bs)
            sampled += decodes
            if self.decode_planner is not None:
                decode_plan = self.decode_planner.plan([seq.block_table for seq in decodes],
                                                       [seq.num_tokens for seq in decodes])
            max_blocks = max(len(seq.block_table) for seq in decodes)
            block_tables = self._tensor([seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in decodes])
            context_lens = self._tensor([seq.num_tokens for seq in decodes])
        meta = AttentionMetadata(
            slot_blocks=self._tensor(slot_blocks), slot_offsets=self._tensor(slot_offsets),
            last_token_indices=self._tensor(last + scored_rows), prefill_bounds=bounds or None,
            prefill_cached=cached or None, prefill_block_tables=tables or None, block_tables=block_tables, context_lens=context_lens,
            decode_plan=decode_plan)
        return self._tensor(input_ids), self._tensor(positions), meta, sampled, scored

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Computes one step and returns the token sampled for each sequence that reached the
        end of its known tokens (decodes, and prompts whose last piece this step computed)."""
        # A prefill of many prompts runs as forwards of about prefill_group_tokens each (whole
        # pieces): the activations then stay in cache, and the GEMMs run at the row count they
        # are fastest at on CPU, against one forward over every prompt. A step's decodes ride
        # with the last group, so a mixed step is grouped as well. Results are the same either way.
        groups = self._prefill_groups(step.prefills)
        if len(groups) < 2:
            return self._run(step.prefills, step.decodes)
        if self.tp is not None:   # every rank runs each forward whole, its LM head's gather included
            sampled = []
            for group in groups[:-1]:
                sampled += self._run(group, [])
            return sampled + self._run(groups[-1], step.decodes)
        # The LM head once for the step, over every group's sampled rows: it reads the whole
        # vocabulary's weights whatever the number of rows.
        seqs, hidden = [], []
        for i, group in enumerate(groups):
            sampled, scored, h = self._forward(group, step.decodes if i == len(groups) - 1 else [], head=None)
            if scored:   # prompt log-probabilities: scored now
                self._score_prompts(self.model.logits(h[len(sampled):]), scored)
            seqs += sampled
            hidden.append(h[:len(sampled)])
        return self._sample(self.model.logits(torch.cat(hidden)), seqs)

    def _prefill_groups(self, prefills: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        groups, current, size = [], [], 0
        for seq, n in prefills:
            if current and size + n > self.prefill_group_tokens:
                groups.append(current)
                current, size = [], 0
            current.append((seq, n))
            size += n
        return groups + [current] if current else groups

    def _run(self, prefills: list[tuple[Sequence, int]], decodes: list[Sequence]) -> list[tuple[Sequence, int]]:
        if not prefills and self.decode_graphs is not None:
            logits = self.decode_graphs.run(decodes)   # None: a batch larger than every graph
            if logits is not None:
                self.progress.at = time.monotonic()
                return self._sample(logits, decodes)
        sampled, scored, logits = self._forward(prefills, decodes, head=self.model.logits)
        if scored:
            self._score_prompts(logits[len(sampled):], scored)
            logits = logits[:len(sampled)]
        return self._sample(logits, sampled)

    def _forward(self, prefills: list[tuple[Sequence, int]], decodes: list[Sequence], head):
        """One forward: (the sequences to sample, the (sequence, position) pairs whose prompt
        log-probabilities are scored, the rows of both: the sampled ones first). Rows are the
        last hidden states, or their logits with head=model.logits: the LM head inside the
        forward, where the other TP ranks run it (before their KV push reports)."""
        input_ids, positions, meta, sampled, scored = self._prepare(prefills, decodes)
        meta.progress = self.progress
        if self.layer_push is not None and prefills:
            meta.after_layer = self.layer_push([(seq.request_id, seq.block_table, seq.num_cached_tokens + n)
                                                for seq, n in prefills])
        if self.tp is not None:   # the other ranks run the same forward over their shards
            self.tp.send_step(step_payload(input_ids, positions, meta))
        with self.kernels.step_threads(0 if prefills else len(decodes)):
            rows = self.model.last_hidden(input_ids, positions, self.kv_cache, meta)
            if head is not None:
                rows = head(rows)
        if self.tp is not None and meta.after_layer is not None:   # the handoff is whole when every rank's heads landed
            meta.after_layer.merge(self.tp.push_reports())
        return sampled, scored, rows

    def _sample(self, logits: torch.Tensor, sampled: list[Sequence]) -> list[tuple[Sequence, int]]:
        if not sampled:
            return []
        return list(zip(sampled, self.sampler.sample(logits, sampled, self.eos_ids)))

    def _score_prompts(self, logits: torch.Tensor, scored: list[tuple[Sequence, int]]) -> None:
        """Prompt log-probabilities: the logits of each scored position give its next prompt token's."""
        found = self.sampler.prompt_logprobs(logits, [seq.prompt_token_ids[p + 1] for seq, p in scored],
                                             [seq.params.prompt_logprobs for seq, _ in scored])
        for (seq, _), lp in zip(scored, found):
            seq.prompt_logprobs.append(lp)

"""The CPU fast kernels against the plain-torch reference; bfloat16 logits against float32."""
import contextlib
import importlib.util
import itertools
import os
import random
import select
import threading
from types import SimpleNamespace

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.config import EngineConfig
from pdserve.engine.kernels import TorchKernels, kernels_for
from pdserve.engine.kernels import variants
from pdserve.engine.kernels.cpu import PANEL_ROWS_MAX, CpuKernels, cpu_flags, extension, load_variant, native_bf16
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner, prefill_group_tokens, resolve_dtype
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.sequence import SamplingParams, Sequence

CPU = torch.device("cpu")
# float32: the same math in another order; bfloat16: a few units of its last place (8 bits)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
DTYPES = [torch.float32, torch.bfloat16]
# every build this CPU can run (the one chosen and the narrower ones), each against the reference
RUNNABLE = [v for v in variants.VARIANTS if v.needs <= cpu_flags()]


def pair(dtype, variant=None):
    cpu = CpuKernels(CPU, dtype)
    if variant is not None:
        cpu.ext = load_variant(variant)
    return TorchKernels(CPU, dtype), cpu


@pytest.fixture(params=RUNNABLE or [None], ids=lambda v: v.name if v else "portable")
def variant(request):
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_reference(dtype, variant):
    ref, cpu = pair(dtype, variant)
    g = torch.Generator().manual_seed(0)
    # rows: every remainder of the panels' 6-row tiles, the last panel row count and the first
    # oneDNN one; outputs that do not fill the last 16-wide panel, whole and partial groups of
    # four panels (AVX-512 builds); K past one 128-wide chunk; x a strided view of a wider row
    cases = ((1, 64, 96, False), (32, 512, 1024, True), (300, 128, 64, False), (5, 64, 100, True),
             (13, 96, 40, False), (PANEL_ROWS_MAX, 128, 48, True), (PANEL_ROWS_MAX + 1, 128, 48, True),
             (9, 200, 124, True), (20, 300, 84, False), (17, 128, 72, True))
    for rows, k, n, bias in cases:
        w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
        b = torch.randn(n, generator=g).to(dtype) if bias else None
        x = torch.randn(rows, k, generator=g).to(dtype)
        torch.testing.assert_close(cpu.linear(w, b)(x), ref.linear(w, b)(x), **TOL[dtype])
        wide = torch.randn(rows, k + 8, generator=g).to(dtype)[:, 4:k + 4]
        torch.testing.assert_close(cpu.linear(w, b)(wide), ref.linear(w, b)(wide), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_body_ops_match_reference(dtype, variant):
    ref, cpu = pair(dtype, variant)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, 32, generator=g).to(dtype)
    pos = torch.arange(7).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, 32, 2) / 32))[None, :]
    emb = torch.cat((pos, pos), -1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    torch.testing.assert_close(cpu.rope(x.clone(), cos, sin), ref.rope(x, cos, sin), **TOL[dtype])
    gu = torch.randn(5, 64, generator=g).to(dtype)
    torch.testing.assert_close(cpu.silu_and_mul(gu.clone()), ref.silu_and_mul(gu), **TOL[dtype])
    h, res = (torch.randn(5, 48, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(48, generator=g).to(dtype)
    for a, b in zip(cpu.add_rms_norm(h, res.clone(), w, 1e-6), ref.add_rms_norm(h, res, w, 1e-6)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    torch.testing.assert_close(cpu.rms_norm(h, w, 1e-6), ref.rms_norm(h, w, 1e-6), **TOL[dtype])
    gu = torch.randn(300, 2 * 40, generator=g).to(dtype) * 4   # rows past one task's grain, large |x|
    torch.testing.assert_close(cpu.silu_and_mul(gu.clone()), ref.silu_and_mul(gu), **TOL[dtype])
    pool = random_pool(dtype, blocks=8, layers=2)
    qkv = torch.randn(6, 5 * 2 * 64, generator=g).to(dtype)   # k and v: strided views into one output
    k, v = qkv[:, :128].view(6, 2, 64), qkv[:, 128:256].view(6, 2, 64)
    meta = AttentionMetadata(slot_blocks=torch.tensor([3, 3, 5, 0, 7, 7]), slot_offsets=torch.tensor([0, 15, 2, 9, 1, 4]),
                             last_token_indices=torch.arange(6))
    expected = pool.clone()
    ref.store_kv(expected, 1, k, v, meta)
    cpu.store_kv(pool, 1, k, v, meta)
    assert torch.equal(pool, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_ops_give_the_same_result_on_one_thread_and_on_the_team(dtype, variant):
    """Below their size threshold the small ops run on the calling thread: both ways agree."""
    _, cpu = pair(dtype, variant)
    if cpu.ext is None:
        pytest.skip("no compiled kernels here")
    g = torch.Generator().manual_seed(5)
    x, res = (torch.randn(70, 96, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(96, generator=g).to(dtype)
    gu = torch.randn(70, 2 * 80, generator=g).to(dtype)
    q = torch.randn(70, 6, 32, generator=g).to(dtype)
    angle = torch.rand(70, 1, 32, generator=g)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)

    def run():
        normed, stream = cpu.add_rms_norm(x, res.clone(), w, 1e-6)
        return normed, stream, cpu.silu_and_mul(gu), cpu.rope(q.clone(), cos, sin)

    ops = ("rms_norm", "silu_and_mul", "rope")
    saved = [cpu.ext.set_serial_work(op, 1 << 40) for op in ops]
    try:
        serial = run()
        for op in ops:
            cpu.ext.set_serial_work(op, 1)
        team = run()
    finally:
        for op, value in zip(ops, saved):
            cpu.ext.set_serial_work(op, value)
    for a, b in zip(serial, team):
        assert torch.equal(a, b)


def random_pool(dtype, blocks=40, layers=2, block_size=16, kv_heads=2, dim=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(blocks, layers, 2, block_size, kv_heads, dim, generator=g).to(dtype)


def decode_meta(context_lens, num_blocks, block_size=16, seed=3):
    """Each sequence gets distinct random blocks, tables padded with 0 as the runner pads them."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = []
    for n in context_lens:
        need = (n + block_size - 1) // block_size
        tables.append([free.pop() for _ in range(need)])
    width = max(map(len, tables))
    tables = [t + [0] * (width - len(t)) for t in tables]
    seqs = len(context_lens)
    return AttentionMetadata(slot_blocks=torch.zeros(seqs, dtype=torch.long),
                             slot_offsets=torch.zeros(seqs, dtype=torch.long),
                             last_token_indices=torch.arange(seqs), block_tables=torch.tensor(tables),
                             context_lens=torch.tensor(context_lens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,heads", [(64, 8), (16, 8), (64, 14), (128, 6)])
@pytest.mark.parametrize("lens", [[1, 17, 100, 33, 16, 250], [77]], ids=["batch", "one"])
def test_decode_attention_matches_reference(dtype, dim, heads, lens, variant):
    """GQA groups of 4, 7 (a 0.5B Qwen's 14 heads over 2) and 3 query heads; a batch (one task per
    sequence) and a single sequence (its KV heads split over threads); partial 16-key tiles."""
    ref, cpu = pair(dtype, variant)
    pool = random_pool(dtype, dim=dim)
    meta = decode_meta(lens, pool.shape[0])
    q = torch.randn(len(lens), heads, dim, generator=torch.Generator().manual_seed(4)).to(dtype)
    for layer in (0, 1):
        expected = ref.decode_attention(q, pool, layer, meta)
        torch.testing.assert_close(cpu.decode_attention(q, pool, layer, meta), expected, **TOL[dtype])
        torch.testing.assert_close(cpu._decode_gather_matmul(q, pool, layer, meta, dim ** -0.5), expected,
                                   **TOL[dtype])


@pytest.mark.parametrize("block_size", [16, 32, 8])
def test_decode_attention_over_several_chunks_and_block_sizes(block_size, variant):
    """Contexts of several ~256-key chunks (the online softmax across chunks), partial 32-key
    tiles, and blocks of 8 slots (the AMX kernel needs whole 16-key tiles per block: the
    avx512_bf16 one runs there)."""
    ref, cpu = pair(torch.bfloat16, variant)
    lens = [300, 513, 31, 32, 33]
    pool = random_pool(torch.bfloat16, blocks=sum(n // block_size + 1 for n in lens) + 4, block_size=block_size)
    meta = decode_meta(lens, pool.shape[0], block_size=block_size)
    q = torch.randn(len(lens), 14, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    torch.testing.assert_close(cpu.decode_attention(q, pool, 1, meta), ref.decode_attention(q, pool, 1, meta),
                               **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_ignores_slots_never_written(dtype, variant):
    """Pool slots no sequence wrote hold whatever the memory held, NaN included (the pool is
    torch.empty; a GPU allocator hands back used memory): every decode path gives the clean
    pool's result, since 0 x NaN in a masked-out slot would still poison the output."""
    ref, cpu = pair(dtype, variant)
    lens = [1, 17, 100, 33]
    clean = random_pool(dtype)
    meta = decode_meta(lens, clean.shape[0])
    written = torch.zeros(clean.shape[0], clean.shape[3], dtype=torch.bool)
    for table, n in zip(meta.block_tables.tolist(), lens):
        for p in range(n):
            written[table[p // 16], p % 16] = True
    poisoned = clean.masked_fill(~written[:, None, None, :, None, None], float("nan"))
    q = torch.randn(len(lens), 8, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    expected = ref.decode_attention(q, clean, 0, meta)
    for got in (ref.decode_attention(q, poisoned, 0, meta), cpu.decode_attention(q, poisoned, 0, meta),
                cpu._decode_gather_matmul(q, poisoned, 0, meta, 64 ** -0.5)):
        torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_argmax_matches_torch_max(dtype, variant):
    """Each row's first largest value, as torch's max(dim).indices picks it: ties, a NaN (it
    wins, the first one), a row of -inf only, vocabularies that end inside a vector."""
    ref, cpu = pair(dtype, variant)
    g = torch.Generator().manual_seed(5)
    for vocab in (1, 7, 16, 33, 1000, 8192, 151936):
        logits = torch.randn(12, vocab, generator=g).to(dtype)
        logits[1] = logits[1].round()                       # many ties at the maximum
        logits[2] = float("-inf")
        logits[3, vocab // 2] = float("nan")
        logits[4, vocab - 1] = float("nan")                 # in the tail (past the last whole vector)
        logits[4, vocab // 3] = float("nan")
        logits[5, :] = 1.0                                  # every entry tied
        logits[6, vocab - 1] = 100.0                        # the maximum in the tail
        logits[7, 0] = float("inf")
        assert cpu.argmax(logits).tolist() == ref.argmax(logits).tolist(), vocab
        strided = torch.randn(3, vocab + 5, generator=g).to(dtype)[:, 2:vocab + 2]
        assert cpu.argmax(strided).tolist() == ref.argmax(strided).tolist(), vocab


def test_the_compiled_kernels_run_here():
    """The compiled kernels are what the CPU fast path is: every x86 CPU with AVX2 runs a build."""
    if variants.choose(cpu_flags()) is None:
        pytest.skip("no build for this CPU (no AVX2 and FMA): the portable path runs")
    assert extension()[0] is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_over_a_cached_prefix_equals_the_whole_prompt(dtype):
    """Prefill of the last tokens after a cached prefix (read from the pool) equals the same
    tokens' rows of a prefill of the whole prompt."""
    kernels = TorchKernels(CPU, dtype)
    pool = torch.zeros(8, 1, 2, 4, 2, 32, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    n, cached = 13, 9
    q = torch.randn(n, 4, 32, generator=g).to(dtype)
    k, v = (torch.randn(n, 2, 32, generator=g).to(dtype) for _ in range(2))
    table = torch.tensor([5, 2, 7, 0])
    pos = torch.arange(n)
    blocks, offsets = table[pos // 4], pos % 4
    whole = AttentionMetadata(slot_blocks=blocks, slot_offsets=offsets,
                              last_token_indices=torch.tensor([n - 1]), prefill_bounds=[(0, n)],
                              prefill_cached=[0], prefill_block_tables=[None])
    kernels.store_kv(pool, 0, k, v, whole)
    expected = kernels.prefill_attention(q, k, v, pool, 0, whole)
    tail = AttentionMetadata(slot_blocks=blocks[cached:], slot_offsets=offsets[cached:],
                             last_token_indices=torch.tensor([n - cached - 1]), prefill_bounds=[(0, n - cached)],
                             prefill_cached=[cached], prefill_block_tables=[table])
    got = kernels.prefill_attention(q[cached:], k[cached:], v[cached:], pool, 0, tail)
    torch.testing.assert_close(got, expected[cached:], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_of_many_prompts_equals_each_prompt_alone(dtype):
    """Whole prompts of one length side by side run as one batched attention call; a batch
    mixing lengths and a piece after a cached prefix gives every prompt what it gets alone."""
    kernels = TorchKernels(CPU, dtype)
    pool = torch.zeros(16, 1, 2, 4, 2, 32, dtype=dtype)
    g = torch.Generator().manual_seed(6)
    lengths, cached = [5, 5, 5, 7, 3, 5, 5], [0, 0, 0, 0, 4, 0, 0]
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    q = torch.randn(start, 4, 32, generator=g).to(dtype)
    k, v = (torch.randn(start, 2, 32, generator=g).to(dtype) for _ in range(2))
    # the piece after a cached prefix: its first 4 tokens' KV in blocks 9 and 3
    prefix_k, prefix_v = (torch.randn(4, 2, 32, generator=g).to(dtype) for _ in range(2))
    table = torch.tensor([9, 3])
    prefix = AttentionMetadata(slot_blocks=torch.tensor([9] * 4), slot_offsets=torch.arange(4),
                               last_token_indices=torch.tensor([3]), prefill_bounds=[(0, 4)])
    kernels.store_kv(pool, 0, prefix_k, prefix_v, prefix)
    s4, e4 = bounds[4]
    piece = AttentionMetadata(slot_blocks=torch.tensor([3] * 3), slot_offsets=torch.arange(3),
                              last_token_indices=torch.tensor([2]), prefill_bounds=[(0, 3)])
    kernels.store_kv(pool, 0, k[s4:e4], v[s4:e4], piece)
    meta = AttentionMetadata(slot_blocks=torch.zeros(start, dtype=torch.long), slot_offsets=torch.zeros(start, dtype=torch.long),
                             last_token_indices=torch.tensor([e - 1 for _, e in bounds]), prefill_bounds=bounds,
                             prefill_cached=cached, prefill_block_tables=[table if c else None for c in cached])
    got = kernels.prefill_attention(q, k, v, pool, 0, meta)
    for (s, e), c in zip(bounds, cached):
        alone = AttentionMetadata(slot_blocks=meta.slot_blocks[s:e], slot_offsets=meta.slot_offsets[s:e],
                                  last_token_indices=torch.tensor([e - s - 1]), prefill_bounds=[(0, e - s)],
                                  prefill_cached=[c], prefill_block_tables=[table if c else None])
        torch.testing.assert_close(got[s:e], kernels.prefill_attention(q[s:e], k[s:e], v[s:e], pool, 0, alone),
                                   rtol=0, atol=0)


def test_dtype_auto_follows_the_cpu():
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if native_bf16() else torch.float32)
    assert resolve_dtype("float32", CPU) == torch.float32
    assert EngineConfig(model_path="x").dtype == "auto"
    assert isinstance(kernels_for(CPU, torch.float32), CpuKernels)


def prefill_logits(runner: ModelRunner, prompts: list[list[int]]) -> torch.Tensor:
    seqs = []
    for i, ids in enumerate(prompts):
        seq = Sequence(f"l{i}", ids, SamplingParams())
        start = 1 + sum(len(s.block_table) for s in seqs)   # block 0 took the warm-up
        seq.block_table = list(range(start, start + (len(ids) + runner.block_size - 1) // runner.block_size))
        seqs.append(seq)
    input_ids, positions, meta, *_ = runner._prepare([(s, s.num_tokens) for s in seqs], [])
    with torch.inference_mode():
        return runner.model(input_ids, positions, runner.kv_cache, meta).float()


def test_bfloat16_logits_match_float32(small_model):
    """The demo models' logits are too flat for greedy tokens to agree between dtypes, so the
    bf16 engine's logits are compared with the float32 engine's: within bf16 tolerance."""
    cfg = dict(model_path=small_model, kv_cache_blocks=64, max_model_len=256)
    f32 = ModelRunner(EngineConfig(dtype="float32", **cfg))
    bf16 = ModelRunner(EngineConfig(dtype="bfloat16", **cfg))
    rng = random.Random(6)
    prompts = [[rng.randrange(3, f32.vocab_size) for _ in range(n)] for n in (5, 40, 97)]
    ref, got = prefill_logits(f32, prompts), prefill_logits(bf16, prompts)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 0.05 * scale, ((got - ref).abs().max(), scale)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.999, cos


def test_bfloat16_engine_rotates_by_float32_angles(small_model):
    """RoPE's angles at long positions are those of float32 frequencies, as transformers computes
    them, not of frequencies rounded to the model's bfloat16 (off by up to a radian at 1024)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(small_model)
    head_dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    runner = ModelRunner(EngineConfig(model_path=small_model, dtype="bfloat16", kv_cache_blocks=8, max_model_len=64))
    positions = torch.tensor([0, 100, 1024, 4000])
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq.float().double()[None, :]
    cos, sin = runner.model.rope(positions, torch.float32)
    assert (cos[:, 0, : head_dim // 2].double() - angles.cos()).abs().max() < 1e-3
    assert (sin[:, 0, : head_dim // 2].double() - angles.sin()).abs().max() < 1e-3


def test_prefill_groups_keep_the_widest_activation_within_the_cache_budget():
    """A power of two of tokens from 512 to 4096 whose gate_up output fits 12 MiB."""
    def shape(intermediate, hidden):
        return SimpleNamespace(intermediate_size=intermediate, hidden_size=hidden)
    assert prefill_group_tokens(shape(4864, 896), torch.bfloat16) == 512     # Qwen2.5-0.5B
    assert prefill_group_tokens(shape(1408, 512), torch.bfloat16) == 2048    # the demo
    assert prefill_group_tokens(shape(1408, 512), torch.float32) == 1024
    assert prefill_group_tokens(shape(64, 32), torch.float32) == 4096        # the most
    assert prefill_group_tokens(shape(18944, 3584), torch.bfloat16) == 512   # the least
    assert prefill_group_tokens(SimpleNamespace(hidden_size=512), torch.bfloat16) == 1024   # no intermediate_size: 4x


def test_a_mixed_step_grouped_into_prefill_forwards_gives_the_same_logits(small_model):
    """A step of several prompt pieces and some decodes runs as forwards of about
    prefill_group_tokens prompt tokens, the decodes with the last one, and the LM head and the
    sampler once over every group's rows: the same logits as one forward of the whole step."""
    runner = ModelRunner(EngineConfig(model_path=small_model, dtype="float32", kv_cache_blocks=64, max_model_len=256))
    rng = random.Random(7)
    next_block = iter(range(1, 64))   # block 0 took the warm-up

    def sequence(name, n):
        seq = Sequence(name, [rng.randrange(3, runner.vocab_size) for _ in range(n)], SamplingParams(temperature=0.0))
        seq.block_table = [next(next_block) for _ in range((n + 8 + runner.block_size - 1) // runner.block_size)]
        return seq

    decodes = [sequence(f"d{i}", 20) for i in range(2)]
    runner.run(SchedulerOutput(prefills=[(seq, seq.num_tokens) for seq in decodes]))
    for seq in decodes:
        seq.num_cached_tokens = seq.num_tokens
        seq.output_token_ids.append(5)
    step = SchedulerOutput(prefills=[(sequence(f"p{i}", 30), 30) for i in range(4)], decodes=decodes)
    captured = []
    sample = runner.sampler.sample
    runner.sampler.sample = lambda logits, *args: (captured.append(logits.clone()), sample(logits, *args))[1]
    runner.prefill_group_tokens = 64        # two forwards of two prompts each
    grouped = runner.run(step)
    runner.prefill_group_tokens = 10 ** 6   # one forward
    whole = runner.run(step)
    assert len(captured) == 2 and [s for s, _ in grouped] == [s for s, _ in whole]
    torch.testing.assert_close(captured[0], captured[1], rtol=1e-4, atol=1e-4)


def test_float32_fast_kernels_match_the_reference_model(small_model, monkeypatch):
    """The whole model: CPU kernel set against the plain-torch one, float32, prefill logits."""
    cfg = EngineConfig(model_path=small_model, dtype="float32", kv_cache_blocks=64, max_model_len=256)
    fast = ModelRunner(cfg)
    monkeypatch.setenv("PDSERVE_KERNELS", "torch")
    ref = ModelRunner(cfg)
    assert type(ref.kernels) is TorchKernels and isinstance(fast.kernels, CpuKernels)
    prompts = [[(7 * i + 3) % ref.vocab_size for i in range(n)] for n in (3, 50)]
    torch.testing.assert_close(prefill_logits(fast, prompts), prefill_logits(ref, prompts), rtol=1e-4, atol=1e-4)


def load_shape_tool():
    spec = importlib.util.spec_from_file_location(
        "make_shape_model", os.path.join(os.path.dirname(__file__), "..", "tools", "make_shape_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_shape_model_keeps_the_real_vocabulary_and_generates_as_transformers(tmp_path):
    """tools/make_shape_model.py, Qwen2.5-0.5B's shape narrowed and shortened but with its
    151,936-token vocabulary: the tied embedding rows past the demo tokenizer are zero, and
    pdserve's greedy tokens (float32) are transformers', all of them tokens the tokenizer has."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from pdserve.engine.llm_engine import LLMEngine

    tool = load_shape_tool()
    shape = dict(tool.SHAPES["qwen2.5-0.5b"], num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2)
    tool.write_model(tmp_path, shape)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()                         # tied, as in the real model
        embed = f.get_tensor("model.embed_tokens.weight")
    engine = LLMEngine(EngineConfig(model_path=str(tmp_path), dtype="float32", kv_cache_blocks=64, max_model_len=256))
    known = len(engine.tokenizer)
    assert embed.shape == (151936, 64) and not embed[known:].any() and embed[:known].any()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for i, prompt in enumerate(["def main():", "import os\n" * 5]):
        ids = engine.tokenizer.encode(prompt)
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        got = []
        while engine.has_work():
            for out in engine.step():
                got += list(out.token_ids)
        with torch.no_grad():
            expected = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert got == expected[0, len(ids):].tolist() and max(got) < known


# ---- prefill attention: each build's flash kernel against the reference -----------------------
def flat_batch(lengths, heads, kv_heads, dim, seed, dtype=torch.bfloat16):
    """q, k, v as the model passes them (views into one QKV output row per token) and the
    pieces' bounds in the flat batch."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    q = qkv[:, :heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
    ends = list(itertools.accumulate(lengths))
    return q, k, v, list(zip([0] + ends[:-1], ends))


def prefill_meta(bounds, cached=None, tables=None):
    n = bounds[-1][1]
    return AttentionMetadata(slot_blocks=torch.zeros(n, dtype=torch.long), slot_offsets=torch.zeros(n, dtype=torch.long),
                             last_token_indices=torch.tensor([e - 1 for _, e in bounds]), prefill_bounds=bounds,
                             prefill_cached=cached or [0] * len(bounds), prefill_block_tables=tables or [None] * len(bounds))


@pytest.mark.parametrize("heads,kv_heads,dim,lengths", [
    (14, 2, 64, [256]),
    (14, 2, 64, [1, 15, 16, 17, 33, 256, 100]),
    (4, 4, 64, [40, 1, 300]),                 # a group of 1
    (8, 2, 128, [17, 513, 16, 33]),           # groups of 4; more than one softmax chunk
    (14, 2, 128, [15, 256, 1]),
    (4, 2, 96, [20, 7]),                      # a head size the kernel leaves to SDPA
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_matches_reference(heads, kv_heads, dim, lengths, dtype, variant):
    """Whole prompts of mixed lengths in one flat batch, q, k, v strided as the model passes
    them: every build's prefill attention against the reference's SDPA."""
    ref, cpu = pair(dtype, variant)
    q, k, v, bounds = flat_batch(lengths, heads, kv_heads, dim, seed=sum(lengths), dtype=dtype)
    meta = prefill_meta(bounds)
    torch.testing.assert_close(cpu.prefill_attention(q, k, v, None, 0, meta), ref.prefill_attention(q, k, v, None, 0, meta),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_with_a_cached_piece_matches_reference(dtype, variant):
    """A batch mixing pieces after a cached prefix (the SDPA path, reading the pool) with whole
    prompts (the kernel where the build has one): each piece as the reference computes it."""
    ref, cpu = pair(dtype, variant)
    heads, kv_heads, dim, block = 14, 2, 64, 16
    lengths, cached = [33, 20, 17, 64], [0, 40, 0, 0]
    q, k, v, bounds = flat_batch(lengths, heads, kv_heads, dim, seed=11, dtype=dtype)
    pool = torch.zeros(12, 1, 2, block, kv_heads, dim, dtype=dtype)
    g = torch.Generator().manual_seed(12)
    table = torch.tensor([7, 2, 9, 4])   # the cached piece's blocks: 40 cached tokens, then its 20
    prefix_k, prefix_v = (torch.randn(40, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    s, e = bounds[1]
    pos = torch.arange(60)
    stored = AttentionMetadata(slot_blocks=table[pos // block], slot_offsets=pos % block,
                               last_token_indices=torch.tensor([59]), prefill_bounds=[(0, 60)])
    ref.store_kv(pool, 0, torch.cat((prefix_k, k[s:e])), torch.cat((prefix_v, v[s:e])), stored)
    meta = prefill_meta(bounds, cached, [table if c else None for c in cached])
    torch.testing.assert_close(cpu.prefill_attention(q, k, v, pool, 0, meta), ref.prefill_attention(q, k, v, pool, 0, meta),
                               **TOL[dtype])


def test_the_amx_build_runs_bfloat16_decode_linears_on_tiles():
    """Where the CPU has AMX, a bf16 linear of up to 32 rows multiplies its weight tiles: every row
    count of the two row tiles, outputs short of a whole group, a bias, x a strided view."""
    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        pytest.skip("no AMX on this CPU")
    ref, cpu = pair(torch.bfloat16, variants.VARIANTS[0])
    assert cpu.tile_linears and "bf16 weight tiles" in cpu.describe()
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(88, 96, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(88, generator=g).to(torch.bfloat16)
    linear = cpu.linear(w, b)
    assert linear.tiles is not None
    for rows in (1, 15, 16, 17, 31, 32):
        x = torch.randn(rows, 104, generator=g).to(torch.bfloat16)[:, 4:100]
        out = torch.full((rows, 88), float("nan"), dtype=torch.bfloat16)
        assert cpu.ext.tile_linear(out, x, linear.tiles, b, False)
        torch.testing.assert_close(out, ref.linear(w, b)(x), **TOL[torch.bfloat16])
    assert not pair(torch.float32, variants.VARIANTS[0])[1].tile_linears


def test_the_amx_build_fuses_silu_and_mul_into_the_gate_up_tiles():
    """An MLP's gate_up with SiLU-and-mul: the tiles' epilogue (up to 32 rows) and oneDNN then the
    op (more rows) both give the separate reference ops' result."""
    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        pytest.skip("no AMX on this CPU")
    ref, cpu = pair(torch.bfloat16, variants.VARIANTS[0])
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(2 * 48, 64, generator=g) * 0.2).to(torch.bfloat16)
    b = torch.randn(2 * 48, generator=g).to(torch.bfloat16)
    fused = cpu.silu_gate_up(w, b)
    assert fused.tiles is not None and fused.linear.tiles is None   # one second form, not two
    for rows in (1, 16, 17, 32, 33, 70):
        x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
        torch.testing.assert_close(fused(x), ref.silu_gate_up(w, b)(x), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
def test_avx512_builds_run_the_prefill_kernel(dtype):
    """Where the CPU has AVX-512, float32 prefill attention is the build's flash kernel (FMAs), and
    with avx512_bf16 (dot products) or AMX (tiles) bfloat16's too, not SDPA; the builds without
    them leave it to SDPA."""
    need = "avx512f" if dtype == torch.float32 else "avx512_bf16"
    builds = [v for v in RUNNABLE if need in v.needs]
    if not builds:
        pytest.skip(f"no {need} on this CPU")
    _, cpu = pair(dtype)
    products = ("float32 FMAs" if dtype == torch.float32 else
                "AMX tiles" if "amx_bf16" in variants.choose(cpu_flags()).needs else "bf16 dot products")
    assert cpu.prefill_kernel and f"flash kernel on {products}" in cpu.describe()
    q, k, v, bounds = flat_batch([5, 40], 4, 2, 64, seed=3, dtype=dtype)
    for build in RUNNABLE:
        out = torch.full(q.shape, float("nan"), dtype=dtype)
        ran = load_variant(build).prefill_attention(out, q, k, v, torch.tensor(bounds), 0.125)
        assert ran == (build in builds) and (not ran or not out.isnan().any()), build.name


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_decode_step_gives_the_same_bits_on_the_hot_team(dtype, variant):
    """A decode step's kernels (linears, gate_up, attention, the small ops split over rows) give
    the same bits on the kernels' hot team as on OpenMP. The team is hot only inside
    step_threads of a decode step the linears take, and only for the thread that entered it."""
    _, cpu = pair(dtype, variant)
    if cpu.ext is None:
        pytest.skip("no compiled kernels here")
    cpu.hot_team = True   # as under OMP_WAIT_POLICY=PASSIVE (test_the_hot_team_runs_where_openmp_sleeps)
    g = torch.Generator().manual_seed(8)
    rows = 32
    linear = cpu.linear((torch.randn(1024, 512, generator=g) * 0.05).to(dtype))
    gate_up = cpu.silu_gate_up((torch.randn(2 * 256, 512, generator=g) * 0.05).to(dtype))
    x, res = (torch.randn(rows, 512, generator=g).to(dtype) for _ in range(2))
    norm = torch.randn(512, generator=g).to(dtype)
    qk = torch.randn(rows, 6, 64, generator=g).to(dtype)
    angle = torch.rand(rows, 1, 64, generator=g)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    pool = random_pool(dtype, blocks=320)
    meta = decode_meta([random.Random(i).randrange(1, 150) for i in range(rows)], pool.shape[0])
    q = torch.randn(rows, 8, 64, generator=g).to(dtype)

    def step():
        normed, stream = cpu.add_rms_norm(x, res.clone(), norm, 1e-6)
        return (linear(x), gate_up(x), cpu.decode_attention(q, pool, 1, meta), normed, stream,
                cpu.rope(qk.clone(), cos, sin))

    hot = cpu.tile_linears if dtype == torch.bfloat16 else cpu.panel_linears
    threads = torch.get_num_threads()
    ops = ("rms_norm", "silu_and_mul", "rope")
    saved = [cpu.ext.set_serial_work(op, 1) for op in ops]   # every small op split over rows
    torch.set_num_threads(2)
    try:
        cold = step()
        with cpu.step_threads(rows):
            assert cpu.ext.hot_here() == hot
            other = []

            def elsewhere():   # another thread: its kernels stay on OpenMP, even asking for the team
                other.append(cpu.ext.hot_here())
                cpu.ext.set_hot(2)
                other.append(cpu.ext.hot_here())
                other.append(torch.equal(linear(x), cold[0]))
                cpu.ext.set_hot(0)
            helper = threading.Thread(target=elsewhere)
            helper.start()
            helper.join(timeout=60)
            assert other == [False, not hot, True]   # the team is free where this step did not take it
            assert cpu.ext.hot_here() == hot
            on_team = step()
        assert not cpu.ext.hot_here()
        with cpu.step_threads(0):   # a step with prompt pieces
            assert not cpu.ext.hot_here()
        with cpu.step_threads(PANEL_ROWS_MAX + 1):   # more rows than the panels and tiles take
            assert not cpu.ext.hot_here()
    finally:
        torch.set_num_threads(threads)
        for op, value in zip(ops, saved):
            cpu.ext.set_serial_work(op, value)
    for a, b in zip(cold, on_team):
        assert torch.equal(a, b)


@pytest.mark.parametrize("in_step", [False, True], ids=["between steps", "in a step"])
def test_a_forked_child_runs_decode_steps_on_its_own_team(in_step):
    """The team's workers do not survive a fork: the child of a process that used them (or was
    in a decode step on them when it forked) starts its own, rather than waiting on threads it
    does not have or staying off the team."""
    cpu = CpuKernels(CPU, torch.float32)
    if cpu.ext is None:
        pytest.skip("no compiled kernels here")
    cpu.hot_team = True
    g = torch.Generator().manual_seed(9)
    linear = cpu.linear(torch.randn(256, 128, generator=g))
    x = torch.randn(8, 128, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu.step_threads(8):
            expected = linear(x)
        read, write = os.pipe()
        with cpu.step_threads(8) if in_step else contextlib.nullcontext():
            pid = os.fork()
            if pid == 0:   # the child, still inside the step it forked in: a decode step of its own
                try:
                    with cpu.step_threads(8):
                        same = cpu.ext.hot_here() and torch.equal(linear(x), expected)
                    os.write(write, b"1" if same else b"0")
                finally:
                    os._exit(0)
        os.close(write)
        ready = select.select([read], [], [], 60)[0]
        answer = os.read(read, 1) if ready else b""
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(read)
        assert answer == b"1"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("policy,switch,hot", [("PASSIVE", None, True), ("passive", "1", True), ("PASSIVE", "0", False),
                                               ("ACTIVE", None, False), (None, None, False)])
def test_the_hot_team_runs_where_openmp_sleeps(monkeypatch, policy, switch, hot):
    """Decode steps take the kernels' own team where OpenMP's idle threads sleep (PASSIVE, as
    pdserve starts its engines) unless PDSERVE_HOT_TEAM=0; where OpenMP's threads spin, not."""
    for name, value in (("OMP_WAIT_POLICY", policy), ("PDSERVE_HOT_TEAM", switch)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cpu = CpuKernels(CPU, torch.float32)
    assert cpu.hot_team == (hot and cpu.ext is not None)
    assert ("hot team" in cpu.describe()) == cpu.hot_team


def test_greedy_tokens_are_the_same_on_the_hot_team(small_model, monkeypatch):
    """An engine under OMP_WAIT_POLICY=PASSIVE (as pdserve starts them) runs its decode steps on
    the kernels' hot team, and generates the tokens the OpenMP path does, in both dtypes."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in ("float32", "bfloat16"):
            engine = LLMEngine(EngineConfig(model_path=small_model, dtype=dtype, kv_cache_blocks=128, max_model_len=256))
            kernels = engine.runner.kernels
            assert kernels.hot_team == (kernels.ext is not None)
            tokens = {}
            for hot in (True, False):
                kernels.hot_team = hot
                for i, n in enumerate((5, 40, 17)):
                    prompt = [(11 * j + i) % 1000 + 3 for j in range(n)]
                    engine.add_request(f"{hot}-{i}", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
                while engine.has_work():
                    for out in engine.step():
                        tokens.setdefault(out.request_id, []).extend(out.token_ids)
            for i in range(3):
                assert len(tokens[f"True-{i}"]) == 12 and tokens[f"True-{i}"] == tokens[f"False-{i}"], dtype
    finally:
        torch.set_num_threads(threads)

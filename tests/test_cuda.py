"""The CUDA path, on a machine with a GPU: the contracts the CPU path is held to.

CI has no GPU, so this module skips there; bench/RESULTS.md records its runs on a GPU host
(`python -m pytest tests/test_cuda.py`).
  - the CUDA kernel set (kernels/cuda.py) equals the plain-torch reference, float32 and bfloat16;
  - float32 greedy tokens equal transformers' generate on the same GPU, whatever the arrival
    order, with prefix caching, chunked prefill and preemption at work; every block comes back;
  - bfloat16 logits stay within bf16 tolerance of float32;
  - a served cuda:0 instance answers tritonclient with generate's text;
  - decode steps replayed from CUDA graphs give the eager forward's logits, FlashInfer's paged
    decode (where flashinfer-python is installed) the reference's attention.
"""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve_testing.harness import PdServer, add_model, config_text, inputs
from test_correctness import PROMPTS, hf_greedy, run_engine
from test_decode_graphs import prefilled
from test_kernels import decode_meta, prefill_logits, random_pool

from pdserve.engine.config import EngineConfig
from pdserve.engine.kernels import TorchKernels, kernels_for
from pdserve.engine.kernels.cuda import CudaKernels
from pdserve.engine.kernels.flashinfer_decode import FlashInferDecode
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner, resolve_dtype
from pdserve.engine.sequence import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
CUDA = torch.device("cuda:0")


def test_dtype_auto_is_bfloat16_on_cuda():
    assert resolve_dtype("auto", CUDA) == torch.bfloat16
    assert isinstance(kernels_for(CUDA, torch.float32), CudaKernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_attention_matches_the_reference(dtype):
    ref, fast = TorchKernels(CUDA, dtype), CudaKernels(CUDA, dtype)
    pool = random_pool(dtype).to(CUDA)
    meta = decode_meta([1, 17, 100, 33, 16, 250], pool.shape[0])
    meta.block_tables, meta.context_lens = meta.block_tables.to(CUDA), meta.context_lens.to(CUDA)
    q = torch.randn(6, 8, 64, generator=torch.Generator().manual_seed(4)).to(dtype).to(CUDA)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for layer in (0, 1):
        for _ in range(2):   # the second call reuses the gather buffers
            torch.testing.assert_close(fast.decode_attention(q, pool, layer, meta),
                                       ref.decode_attention(q, pool, layer, meta), **tol)


def test_cuda_kernels_and_bfloat16_logits_match_float32(small_model, monkeypatch):
    cfg = dict(model_path=small_model, device="cuda:0", kv_cache_blocks=64, max_model_len=256)
    rng = random.Random(6)
    f32 = ModelRunner(EngineConfig(dtype="float32", **cfg))
    prompts = [[rng.randrange(3, f32.vocab_size) for _ in range(n)] for n in (5, 40, 97)]
    fast = prefill_logits(f32, prompts)
    bf16 = prefill_logits(ModelRunner(EngineConfig(dtype="bfloat16", **cfg)), prompts)
    monkeypatch.setenv("PDSERVE_KERNELS", "torch")
    ref_runner = ModelRunner(EngineConfig(dtype="float32", **cfg))
    assert type(ref_runner.kernels) is TorchKernels and isinstance(f32.kernels, CudaKernels)
    ref = prefill_logits(ref_runner, prompts)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    scale = ref.abs().max()
    assert (bf16 - ref).abs().max() <= 0.05 * scale, ((bf16 - ref).abs().max(), scale)
    assert torch.nn.functional.cosine_similarity(bf16, ref, dim=-1).min() > 0.999


def test_cuda_greedy_equals_generate_in_any_arrival_order(demo_model):
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    hf = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).to(CUDA).eval()
    expected = {str(i): hf_greedy(hf, tokenizer, p, 24) for i, p in enumerate(PROMPTS)}
    del hf
    # a small pool and a small token budget: preemption and chunked prefill both happen
    engine = LLMEngine(EngineConfig(model_path=demo_model, device="cuda:0", dtype="float32", kv_cache_blocks=24,
                                    max_model_len=512, max_num_batched_tokens=32))
    # min_tokens, as generate's min_new_tokens: EOS cannot be chosen (ignore_eos would let it be
    # chosen and go on, which generate never does: on the GPU's demo model one prompt's argmax is EOS)
    params = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)
    rng = random.Random(7)
    for trial in range(3):
        order = list(range(len(PROMPTS)))
        rng.shuffle(order)
        arrivals = [0] * len(order) if trial == 0 else [rng.randrange(0, 30) for _ in order]
        got = run_engine(engine, [(str(i), PROMPTS[i], params) for i in order], arrivals)
        assert got == expected, f"trial {trial}"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_cuda_instance_serves_generate_text(demo_model, repo):
    add_model(repo, "tiny-qwen2", demo_model, config_text(role_groups=(("BOTH", "cuda:0"),)))
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    hf = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).to(CUDA).eval()
    server = PdServer(repo).start()
    try:
        server.wait_ready("tiny-qwen2")
        for prompt in PROMPTS[:4]:
            expected = tokenizer.decode(hf_greedy(hf, tokenizer, prompt, 32), skip_special_tokens=True)
            result = server.client.infer("tiny-qwen2", inputs(
                prompt, False, {"max_tokens": 32, "min_tokens": 32, "temperature": 0}, exclude_input_in_output=True))
            assert result.as_numpy("text_output")[0].decode() == expected, prompt
    finally:
        server.stop()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replayed_decode_graphs_give_the_eager_logits(small_model, dtype):
    runner = ModelRunner(EngineConfig(model_path=small_model, device="cuda:0", dtype=dtype, kv_cache_blocks=64,
                                      max_model_len=256, max_num_seqs=12))
    graphs = runner.decode_graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 12] and graphs.scratch_block == 64
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=3e-2, atol=3e-2)
    for count, seed in ((5, 1), (3, 2), (1, 3), (12, 4)):
        seqs = prefilled(runner, count, seed)
        _, _, eager = runner._forward([], seqs, head=runner.model.logits)
        torch.testing.assert_close(graphs.run(seqs).float(), eager.float(), **tol)
    eager_runner = ModelRunner(EngineConfig(model_path=small_model, device="cuda:0", dtype=dtype, kv_cache_blocks=64,
                                            max_model_len=256, max_num_seqs=12, enforce_eager=True))
    assert eager_runner.decode_graphs is None and eager_runner.num_blocks == 64


def test_flashinfer_paged_decode_matches_the_reference():
    flashinfer = pytest.importorskip("flashinfer")
    dtype = torch.bfloat16
    pool = random_pool(dtype).to(CUDA)
    lens = [1, 17, 100, 33, 16, 250]
    meta = decode_meta(lens, pool.shape[0])
    meta.block_tables, meta.context_lens = meta.block_tables.to(CUDA), meta.context_lens.to(CUDA)
    q = torch.randn(6, 8, 64, generator=torch.Generator().manual_seed(4)).to(dtype).to(CUDA)
    kernel = FlashInferDecode(flashinfer, CUDA, dtype, 8, 2, 64, 16, max_blocks=16)
    kernels = CudaKernels(CUDA, dtype)
    for graph_size in (None, 8):
        tables = meta.block_tables.tolist() + [[0]] * (0 if graph_size is None else graph_size - len(lens))
        context = lens + [1] * (len(tables) - len(lens))
        meta.decode_plan = kernel.plan(tables, context, graph_size=graph_size)
        for layer in (0, 1):
            got = kernels.decode_attention(torch.cat([q, q[:len(tables) - len(lens)]]), pool, layer, meta)[:len(lens)]
            meta.decode_plan, plan = None, meta.decode_plan
            torch.testing.assert_close(got, TorchKernels(CUDA, dtype).decode_attention(q, pool, layer, meta),
                                       rtol=3e-2, atol=3e-2)
            meta.decode_plan = plan

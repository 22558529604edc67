"""Each model family (engine/models/) gives transformers' greedy tokens in float32.

Every model is written by transformers from a tiny config with seeded random weights (nothing
downloaded) and the demo model's tokenizer, then run by an in-process engine next to
transformers' generate. The prompts cross KV blocks and sliding windows, and a small token
budget splits the long ones into pieces (chunked prefill over cached blocks)."""
import os
import random
import shutil

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve_testing.harness import DEMO_MODEL, PdServer, add_model, config_text, inputs

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.models import SUPPORTED_MODEL_TYPES, build_model
from pdserve.engine.sequence import SamplingParams

VOCAB = 8192   # the demo tokenizer's
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, eos_token_id=0, bos_token_id=0, pad_token_id=0,
              # wider than the usual 0.02: peaked next-token distributions, no near-ties for rounding to flip
              initializer_range=0.08)
MOE = dict(intermediate_size=96, num_experts_per_tok=2)

CONFIGS = {
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON, **MOE, moe_intermediate_size=32, shared_expert_intermediate_size=80, num_experts=8,
        norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, **MOE, head_dim=32, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, **MOE, num_local_experts=4),
    "mixtral_window": lambda: transformers.MixtralConfig(**COMMON, **MOE, num_local_experts=4, sliding_window=12),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON, intermediate_size=96, head_dim=16, query_pre_attn_scalar=24, sliding_window=12,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 4}, intermediate_size=96, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=12, sliding_window_pattern=2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}}),
    "phi3": lambda: transformers.Phi3Config(**COMMON, intermediate_size=96),
    # LongRoPE with a short original length, so the generation crosses from short to long factors
    "phi3_longrope": lambda: transformers.Phi3Config(
        **COMMON, intermediate_size=96, original_max_position_embeddings=48, sliding_window=40,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0,
                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [2.0 + 0.5 * i for i in range(8)]}),
}
# LongRoPE's factors depend on the whole prompt's length (transformers computes a prompt in one
# forward): a prompt past original_max_position_embeddings must not be split into pieces (phi3.py)
TOKEN_BUDGET = {"phi3_longrope": 256}


def write_model(config, out_dir: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO_MODEL, name), out_dir)
    return out_dir


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outputs = {str(i): [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id] += list(out.token_ids)
    return [outputs[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_greedy_equals_transformers(family, tmp_path, demo_model):
    path = write_model(CONFIGS[family](), str(tmp_path / family))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = random.Random(1)
    # one token, under a block, over the window, and long enough to be split into pieces
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 7, 23, 70)]
    new_tokens = 24
    engine = LLMEngine(EngineConfig(model_path=path, dtype="float32", kv_cache_blocks=64, max_model_len=256,
                                    max_num_batched_tokens=TOKEN_BUDGET.get(family, 32)))
    got = engine_greedy(engine, prompts, new_tokens)
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(hf, prompt, new_tokens), (family, len(prompt))


def test_an_unsupported_model_type_is_a_config_error_naming_what_runs():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported") as err:
        build_model(config, [])
    for model_type in ("llama", "qwen3_moe", "mixtral", "gemma3_text", "phi3"):
        assert model_type in str(err.value)
    assert set(SUPPORTED_MODEL_TYPES) >= {"qwen2", "qwen2_moe", "gemma2"}


def test_moe_model_through_a_pd_handoff_equals_transformers(tmp_path, demo_model, repo):
    """A Qwen3-MoE model served by a PREFILL and a DECODE engine (real processes, KV handed
    over) streams transformers' greedy text."""
    path = write_model(CONFIGS["qwen3_moe"](), str(tmp_path / "qwen3_moe"))
    add_model(repo, "moe", path, config_text(role_groups=(("PREFILL", "cpu"), ("DECODE", "cpu"))))
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    server = PdServer(repo).start()
    try:
        server.wait_ready("moe")
        for prompt in ("def fibonacci(n):", "class Parser(object):\n    \"\"\"" * 4):
            expected = tokenizer.decode(hf_greedy(hf, tokenizer(prompt).input_ids, 20), skip_special_tokens=True)
            result = server.client.infer("moe", inputs(prompt, False, {"max_tokens": 20, "temperature": 0,
                                                                       "ignore_eos": True},
                                                       exclude_input_in_output=True))
            assert result.as_numpy("text_output")[0].decode() == expected, prompt
        server.wait_for(lambda: server.metric_value("pdserve_kv_transfer_seconds_count", model="moe") >= 2,
                        "the prefill engine's two handoffs in the metrics", 10)
    finally:
        server.stop()

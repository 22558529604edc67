"""Each model family (engine/models/) gives transformers' greedy tokens in float32.

Every model is written by transformers from a tiny config with seeded random weights (nothing
downloaded) and the demo model's tokenizer, then run by an in-process engine next to
transformers' generate. The prompts cross KV blocks and sliding windows, and a small token
budget splits the long ones into pieces (chunked prefill over cached blocks). Then one served
repository holds a model of every family, streamed through tritonclient, with an MoE and an MLA
model also served by a PREFILL and a DECODE engine (the KV handed over)."""
import json
import os
import queue
import random
import re
import shutil

import pytest
import torch
import transformers
import tritonclient.grpc as grpcclient
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve_testing.engines import greedy_tokens
from pdserve_testing.harness import DEMO_MODEL, PdServer, add_model, config_text, inputs

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.models import SUPPORTED_MODEL_TYPES, build_model

VOCAB = 8192   # the demo tokenizer's
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, eos_token_id=0, bos_token_id=0, pad_token_id=0,
              # wider than the usual 0.02: peaked next-token distributions, no near-ties for rounding to flip
              initializer_range=0.08)
MOE = dict(intermediate_size=96, num_experts_per_tok=2)
# multi-head latent attention: a latent of 32 + 8 rotary values per token and layer in the pool;
# 8 routed experts in 4 groups of which 2 are searched, one shared expert, layer 0 dense
MLA = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=24, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
           n_group=4, topk_group=2)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, intermediate_size=96),
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
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**COMMON, **MOE, **MLA}, routed_scaling_factor=2.5, norm_topk_prob=True),
    # V2-Lite's shape (no query compression), group-limited greedy routing, and YaRN (its mscale
    # in the softmax scale)
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **{**COMMON, **MOE, **MLA, "q_lora_rank": None}, topk_method="group_limited_greedy", routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 128,
                         "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}),
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
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):   # zero at init: random, so the routing depends on it
            buffer.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO_MODEL, name), out_dir)
    return out_dir


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


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
    # slots no token has written hold whatever the memory held: none may reach an output
    engine.runner.kv_cache.fill_(float("nan"))
    got = greedy_tokens(engine, prompts, new_tokens)
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(hf, prompt, new_tokens), (family, len(prompt))


def test_mla_latent_blocks_come_back_from_the_host_tier_with_transformers_tokens(tmp_path):
    """MLA's latent pool under the prefix cache and a host KV tier: a prompt the pool evicted is
    served again from blocks copied back out of the tier, with transformers' greedy tokens."""
    path = write_model(CONFIGS["deepseek_v3"](), str(tmp_path / "deepseek_v3"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = random.Random(2)
    first, *others = [[rng.randrange(3, VOCAB) for _ in range(70)] for _ in range(4)]
    # 12 blocks of 16 tokens: the three other prompts (5 blocks each) evict the first one's
    engine = LLMEngine(EngineConfig(model_path=path, dtype="float32", kv_cache_blocks=12, max_model_len=256,
                                    max_num_seqs=2, kv_offload_host_gb=0.001))
    for prompt in (first, *others, first):
        assert greedy_tokens(engine, [prompt], 8) == [hf_greedy(hf, prompt, 8)]
    tier = engine.stats().kv_tiers[0]
    assert tier.hit_tokens == 64      # the first prompt's 4 full blocks
    assert tier.loaded_bytes == 4 * 16 * (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * COMMON["num_hidden_layers"] * 4


def test_an_unsupported_model_type_is_a_config_error_naming_what_runs():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported") as err:
        build_model(config, [])
    for model_type in ("llama", "qwen3_moe", "mixtral", "gemma3_text", "phi3", "deepseek_v3"):
        assert model_type in str(err.value)
    assert set(SUPPORTED_MODEL_TYPES) >= {"qwen2", "qwen2_moe", "gemma2"}


# one repository, one server: a model of each family (aggregated), and the MoE and MLA ones again
# on a PREFILL and a DECODE engine
SERVED = ("llama", "qwen3_moe", "mixtral", "deepseek_v3", "deepseek_v2", "gemma3_text", "phi3")
HANDED_OFF = ("qwen3_moe", "deepseek_v3")
PROMPT = "class Parser(object):\n    \"\"\"Reads the tokens of a file.\"\"\"\n    def __init__(self, path):"
SMALL = dict(max_model_len=256, kv_cache_blocks=64, max_num_seqs=4)


@pytest.fixture(scope="module")
def families(tmp_path_factory, demo_model):
    root = tmp_path_factory.mktemp("families")
    repo = str(root / "repository")
    paths = {family: write_model(CONFIGS[family](), str(root / family)) for family in SERVED}
    for family in SERVED:
        add_model(repo, family, paths[family], config_text(**SMALL))
    for family in HANDED_OFF:
        add_model(repo, f"{family}-pd", paths[family],
                  config_text(role_groups=(("PREFILL", "cpu"), ("DECODE", "cpu")), **SMALL))
    server = PdServer(repo).start()
    try:
        for name in SERVED + tuple(f"{f}-pd" for f in HANDED_OFF):
            server.wait_ready(name, timeout=240)
        yield server, paths
    finally:
        server.stop()


def streamed_tokens(server: PdServer, model: str, prompt: str, n: int) -> tuple[list[int], str]:
    """A greedy request streamed through tritonclient: the token ids (from the logprobs output) and the text."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: responses.put(error or result))
    client.async_stream_infer(model, inputs(prompt, True, {"max_tokens": n, "temperature": 0, "ignore_eos": True,
                                                           "logprobs": 0},
                                            exclude_input_in_output=True, return_logprobs=True))
    client.stop_stream()
    client.close()
    tokens, text = [], ""
    while not responses.empty():
        result = responses.get()
        assert not isinstance(result, Exception), result
        text += "".join(t.decode() for t in result.as_numpy("text_output") or ())
        if result.as_numpy("logprobs") is not None:
            tokens += [t["token_id"] for t in json.loads(result.as_numpy("logprobs")[0])["tokens"]]
    return tokens, text


def test_one_repository_serves_every_family_with_transformers_greedy_tokens(families):
    server, paths = families
    for family in SERVED:
        tokenizer = AutoTokenizer.from_pretrained(paths[family])
        hf = AutoModelForCausalLM.from_pretrained(paths[family], dtype=torch.float32).eval()
        expected = hf_greedy(hf, tokenizer(PROMPT).input_ids, 24)
        tokens, text = streamed_tokens(server, family, PROMPT, 24)
        assert tokens == expected, family
        assert text == tokenizer.decode(expected, skip_special_tokens=True), family


def engine_log(record: dict) -> str:
    """An engine's own log: its stdout is the file the supervisor opened for it."""
    with open(os.readlink(f"/proc/{record['pid']}/fd/1"), errors="replace") as f:
        return f.read()


def test_mla_pool_holds_the_latent_and_the_load_log_says_its_bytes_per_token(families):
    """(kv_lora_rank + qk_rope_head_dim) x layers x 4 bytes (float32) per token, on every DeepSeek
    engine (PREFILL and DECODE ones too), where full K and V would be 2 x heads x (qk_nope +
    qk_rope) x layers x 4 = 1152; next to a Llama-family engine's full K and V."""
    server, _ = families
    latent = (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * COMMON["num_hidden_layers"] * 4
    full = 2 * COMMON["num_key_value_heads"] * (COMMON["hidden_size"] // COMMON["num_attention_heads"]) \
        * COMMON["num_hidden_layers"] * 4
    expected = {"deepseek_v2": latent, "deepseek_v3": latent, "deepseek_v3-pd": latent, "llama": full}
    logged = {}
    for record in server.engines():
        if record["model"] in expected:
            found = re.findall(r"KV pool: \d+ blocks of \d+ tokens, (\d+) bytes per token", engine_log(record))
            logged.setdefault(record["model"], set()).update(int(n) for n in found)
    assert logged == {model: {n} for model, n in expected.items()}


def test_moe_and_mla_models_give_the_aggregated_text_through_a_pd_handoff(families):
    """The Qwen3-MoE and DeepSeek-V3 models, served by a PREFILL and a DECODE engine (real
    processes, the KV handed over: full K/V blocks, and MLA's latent blocks), stream the text of
    the same model served aggregated, which is transformers' greedy text."""
    server, paths = families
    params = {"max_tokens": 20, "temperature": 0, "ignore_eos": True}
    prompts = ("def fibonacci(n):", PROMPT * 2)
    for family in HANDED_OFF:
        tokenizer = AutoTokenizer.from_pretrained(paths[family])
        hf = AutoModelForCausalLM.from_pretrained(paths[family], dtype=torch.float32).eval()
        for prompt in prompts:
            texts = [server.client.infer(model, inputs(prompt, False, params, exclude_input_in_output=True))
                     .as_numpy("text_output")[0].decode() for model in (family, f"{family}-pd")]
            expected = tokenizer.decode(hf_greedy(hf, tokenizer(prompt).input_ids, 20), skip_special_tokens=True)
            assert texts == [expected, expected], (family, prompt)
        server.wait_for(lambda: server.metric_value("pdserve_kv_transfer_seconds_count", model=f"{family}-pd")
                        >= len(prompts), f"{family}-pd's handoffs in the metrics", 10)

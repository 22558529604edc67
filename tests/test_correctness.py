"""Generation equals transformers' generate, token for token; seeds repeat; preemption loses nothing."""
import queue
import random

import pytest
import torch
import tritonclient.grpc as grpcclient
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve_testing.harness import PdServer, add_model, config_text, inputs

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sequence import SamplingParams

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Parser(object):\n    \"\"\"",
           "The quick brown fox jumps over the lazy dog. " * 6, "x", "for i in range(10):\n    print(i)\n" * 4,
           "# Copyright", "return self._value", "if __name__ == '__main__':", "with open(path) as f:",
           "raise ValueError(", "@property\ndef name(self):", "lambda x: x * 2", "try:\n    import json\nexcept",
           "async def main():\n    await", "yield from"]


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def run_engine(engine: LLMEngine, requests: list[tuple[str, str, SamplingParams]], arrival_steps: list[int]):
    """Feeds requests at the given scheduler steps; returns {request_id: token ids}."""
    outputs: dict[str, list[int]] = {rid: [] for rid, _, _ in requests}
    pending = sorted(zip(arrival_steps, requests), key=lambda x: x[0])
    step = 0
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            _, (rid, prompt, params) = pending.pop(0)
            engine.add_request(rid, engine.tokenizer.encode(prompt), params)
        for out in engine.step():
            outputs[out.request_id] += list(out.token_ids)
        step += 1
    return outputs


def test_server_greedy_equals_transformers_generate(demo_model, repo):
    """One request at a time in float32, through the server, on the demo model."""
    add_model(repo, "tiny-qwen2", demo_model, config_text(max_model_len=1024))
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    hf = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    server = PdServer(repo).start()
    try:
        server.wait_ready("tiny-qwen2")
        for prompt in PROMPTS[:6]:
            expected = hf_greedy(hf, tokenizer, prompt, 32)
            result = server.client.infer("tiny-qwen2", inputs(
                prompt, False, {"max_tokens": 32, "temperature": 0, "ignore_eos": True},
                exclude_input_in_output=True, return_num_output_tokens=True))
            assert result.as_numpy("num_output_tokens")[0] == 32
            assert result.as_numpy("text_output")[0].decode() == tokenizer.decode(expected, skip_special_tokens=True), prompt
    finally:
        server.stop()


@pytest.fixture(scope="module")
def float64_engine(tmp_path_factory):
    from pdserve_testing.harness import make_model
    path = make_model(str(tmp_path_factory.mktemp("f64") / "weights"), layers=2, hidden=128, intermediate=256)
    engine = LLMEngine(EngineConfig(model_path=path, dtype="float64", kv_cache_blocks=512, max_model_len=512))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return engine, hf, AutoTokenizer.from_pretrained(path)


def test_concurrent_greedy_equals_generate_in_any_arrival_order(float64_engine):
    engine, hf, tokenizer = float64_engine
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = {str(i): hf_greedy(hf, tokenizer, p, 24) for i, p in enumerate(PROMPTS)}
    rng = random.Random(7)
    for trial in range(3):
        order = list(range(len(PROMPTS)))
        rng.shuffle(order)
        requests = [(str(i), PROMPTS[i], params) for i in order]
        arrivals = [0] * len(order) if trial == 0 else [rng.randrange(0, 30) for _ in order]
        got = run_engine(engine, requests, arrivals)
        assert got == expected, f"trial {trial}"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seeded_sampling_repeats_whatever_the_batch(float64_engine):
    engine, _, _ = float64_engine
    seeded = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=42, ignore_eos=True)
    alone = run_engine(engine, [("s", "import re", seeded)], [0])["s"]
    crowd = [(f"n{i}", p, SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    together = run_engine(engine, crowd + [("s", "import re", seeded)], [0] * len(crowd) + [3])["s"]
    assert alone == together
    other = run_engine(engine, [("s", "import re", SamplingParams(**{**seeded.__dict__, "seed": 43}))], [0])["s"]
    assert other != alone


def test_min_tokens_and_stop_token_ids(float64_engine):
    engine, hf, tokenizer = float64_engine
    greedy = run_engine(engine, [("g", "def f", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))], [0])["g"]
    stop_at = greedy[5]
    first = greedy.index(stop_at)
    got = run_engine(engine, [("s", "def f", SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_at,)))], [0])["s"]
    assert got == greedy[:first + 1]
    later = run_engine(engine, [("m", "def f", SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_at,),
                                                               min_tokens=first + 2))], [0])["m"]
    assert len(later) > first + 1


def test_64_streams_through_a_small_pool_all_complete(demo_model, repo):
    """Preemption: the pool holds far fewer than 64 sequences (a stream ends with 3 blocks, the pool
    has 16: six streams decoding at once preempt, however the front end spreads their arrival);
    every stream still completes."""
    add_model(repo, "tiny-qwen2", demo_model, config_text(kv_cache_blocks=16, max_num_seqs=64, max_model_len=128))
    server = PdServer(repo).start()
    try:
        server.wait_ready("tiny-qwen2")
        params = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
        expected = server.client.infer("tiny-qwen2", inputs("def handler(event):", False, params,
                                                             exclude_input_in_output=True)).as_numpy("text_output")[0].decode()
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(server.url)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i in range(64):
            client.async_stream_infer("tiny-qwen2", inputs("def handler(event):", True, params,
                                                           return_num_output_tokens=True), request_id=str(i))
        texts = {str(i): "" for i in range(64)}
        counts = {str(i): 0 for i in range(64)}
        done = 0
        while done < 64:
            result, error = results.get(timeout=240)
            assert error is None, error
            rid = result.get_response().id
            texts[rid] += result.as_numpy("text_output")[0].decode()
            counts[rid] += int(result.as_numpy("num_output_tokens")[0])
            done += result.get_response().parameters["triton_final_response"].bool_param
        client.stop_stream()
        client.close()
        assert all(n == 40 for n in counts.values())
        assert all(t == expected for t in texts.values())
        assert server.metric_value("pdserve_preemptions_total", model="tiny-qwen2") > 0
        server.wait_for(lambda: server.metric_value("pdserve_kv_cache_usage_ratio", model="tiny-qwen2") == 0,
                        "every block to be free", 10)
    finally:
        server.stop()

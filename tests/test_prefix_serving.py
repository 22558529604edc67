"""Prefix caching and chunked prefill as a user sees them: real engine processes, the demo model,
tritonclient streams. Timings are ratios measured in the same run (this VM is noisy: each
figure is the median of a few requests with prompts of their own)."""
import random
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from pdserve_testing.harness import PdServer, add_model, config_text

from pdserve_clients import LLMClient

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    return AutoTokenizer.from_pretrained(demo_model)


def make_prompt(tokenizer, n_tokens: int, seed: int) -> str:
    """A text of about n_tokens tokens of its own (random ids, decoded)."""
    rng = random.Random(seed)
    ids = tokenizer.encode(tokenizer.decode([rng.randrange(300, 8000) for _ in range(n_tokens + 64)]))
    return tokenizer.decode(ids[:n_tokens])


def serve(repo, demo_model, groups, **params) -> PdServer:
    add_model(repo, "tiny-qwen2", demo_model, config_text(groups, max_model_len=2048, kv_cache_blocks=2048, **params))
    server = PdServer(repo).start()
    server.wait_ready("tiny-qwen2")
    return server


def test_pd_prefix_cache_cuts_ttft_of_repeated_and_extended_prompts(repo, demo_model, tokenizer):
    """The demo PD config: a repeated 1500-token prompt reaches its first token in at most 0.35x
    the time of the first, with the same greedy text; the same prefix with a new tail in 0.5x."""
    server = serve(repo, demo_model, (("PREFILL", "cpu:0"), ("DECODE", "cpu:1")), kv_transport="mooncake")
    client = LLMClient(server.url)
    try:
        client.stream_all(make_prompt(tokenizer, 64, 0), max_tokens=2, **GREEDY)    # warm-up
        first, repeat, extended = [], [], []
        for seed in (1, 2, 3):
            prompt = make_prompt(tokenizer, 1500, seed)
            cold = client.stream_all(prompt, max_tokens=8, **GREEDY)
            warm = client.stream_all(prompt, max_tokens=8, **GREEDY)
            assert warm.text == cold.text and warm.num_output_tokens == 8
            tail = client.stream_all(prompt + make_prompt(tokenizer, 100, 10 + seed), max_tokens=8, **GREEDY)
            assert tail.num_output_tokens == 8
            first.append(cold.ttft_s)
            repeat.append(warm.ttft_s)
            extended.append(tail.ttft_s)
        cold, warm, tail = (statistics.median(x) for x in (first, repeat, extended))
        print(f"TTFT first {cold * 1000:.0f} ms, repeated {warm * 1000:.0f} ms ({warm / cold:.2f}x), "
              f"new tail {tail * 1000:.0f} ms ({tail / cold:.2f}x)")
        assert warm <= 0.35 * cold and tail <= 0.5 * cold
    finally:
        client.close()
        server.stop()


def test_chunked_prefill_keeps_running_streams_flowing(repo, demo_model, tokenizer):
    """One BOTH engine: while an 1800-token prompt is prefilled, a running stream's longest gap
    is at most 0.4x that prompt's prefill time alone, and the prompt's TTFT at most 2x alone."""
    server = serve(repo, demo_model, (("BOTH", "cpu"),))
    client = LLMClient(server.url)
    try:
        client.stream_all(make_prompt(tokenizer, 64, 0), max_tokens=2, **GREEDY)    # warm-up
        alone = statistics.median(client.stream_all(make_prompt(tokenizer, 1800, seed), max_tokens=1, **GREEDY).ttft_s
                                  for seed in (21, 22, 23))
        running = {}
        started, done = threading.Event(), threading.Event()

        def stream():
            bg = LLMClient(server.url)
            try:
                for _ in bg.stream(make_prompt(tokenizer, 32, 30), max_tokens=1500, **GREEDY):
                    started.set()
                    if done.is_set():
                        break       # cancels the stream
                running["result"] = bg.result
            finally:
                bg.close()

        thread = threading.Thread(target=stream)
        thread.start()
        assert started.wait(60)
        loaded = []
        for seed in (31, 32):
            loaded.append(client.stream_all(make_prompt(tokenizer, 1800, seed), max_tokens=1, **GREEDY).ttft_s)
        done.set()
        thread.join(60)
        times = running["result"].piece_times
        worst = max(b - a for a, b in zip(times, times[1:]))
        ttft = statistics.median(loaded)
        print(f"prefill alone {alone * 1000:.0f} ms; under load TTFT {ttft * 1000:.0f} ms ({ttft / alone:.2f}x); "
              f"the stream's worst gap {worst * 1000:.0f} ms ({worst / alone:.2f}x)")
        assert worst <= 0.4 * alone and ttft <= 2 * alone
    finally:
        client.close()
        server.stop()


def per_engine(server, name: str) -> dict[str, float]:
    return {s.labels["instance"]: s.value for samples in server.metrics().values() for s in samples
            if s.name == name and s.labels.get("model") == "tiny-qwen2"}


def test_kv_aware_routing_sends_a_shared_prefix_to_its_holder_and_spreads_the_rest(repo, demo_model, tokenizer):
    """Two BOTH engines, the default routing policy (kv_aware): the requests of each prompt family
    go to the engine that holds the family's prefix (the hit counts show it), while unrelated
    concurrent requests land on both engines."""
    server = serve(repo, demo_model, (("BOTH", "cpu:0"), ("BOTH", "cpu:1")))
    client = LLMClient(server.url)
    try:
        queries = lambda: per_engine(server, "pdserve_prefix_cache_queries_total")   # noqa: E731
        hits = lambda: per_engine(server, "pdserve_prefix_cache_hits_total")         # noqa: E731
        server.wait_for(lambda: len(queries()) == 2, "both engines in the metrics", 30)
        families = {}
        for family in (1, 2):
            prefix = make_prompt(tokenizer, 1000, 40 + family)
            for i in range(4):
                before = queries()
                client.stream_all(prefix + f" question {i}: " + make_prompt(tokenizer, 20, 50 + i), max_tokens=2, **GREEDY)
                server.wait_for(lambda: sum(queries().values()) > sum(before.values()), "the request in the metrics", 10)
                served = [k for k, v in queries().items() if v > before.get(k, 0)]
                assert len(served) == 1
                families.setdefault(family, []).append(served[0])
        # every request of a family went to the engine that served its first one (and holds its prefix)
        assert all(len(set(engines)) == 1 for engines in families.values()), (families, server.log()[-3000:])
        held = hits()
        for family, engines in families.items():
            assert held[engines[0]] >= 3 * 960, (family, held)    # 3 repeats x ~1000 cached tokens
        ratios = per_engine(server, "pdserve_prefix_cache_hit_ratio")
        assert max(ratios.values()) > 0.5, ratios
        # unrelated load still spreads: 8 concurrent distinct prompts reach both engines
        before = queries()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: LLMClient(server.url).stream_all(make_prompt(tokenizer, 300, 100 + s),
                                                                      max_tokens=8, **GREEDY), range(8)))
        server.wait_for(lambda: all(queries()[k] > before[k] for k in before), "both engines served the burst", 10)
    finally:
        client.close()
        server.stop()

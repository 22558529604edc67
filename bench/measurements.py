"""The benchmarks' measurements, built from their rounds (bench/rounds.py): the engine with a
batch-size sweep, the server, the two in turn, the decode step at a long context against a
short one, and transformers on the same workload."""
from __future__ import annotations

import statistics
import time

import torch

from perf_analyzer_rounds import PerfAnalyzerRounds
from rounds import DecodeSteps, EngineRounds, ServerRounds, median_round, split_token_ids

ROUNDS = 3  # each measurement repeats; the median round is reported (the machine is shared and noisy)


def bench_engine(model: str, dtype: str, device: str, prompts: list[list[int]], output_len: int,
                 sweep: bool = True, return_tokens: bool = False) -> dict:
    bench = EngineRounds(model, dtype, device, output_len)
    rounds = [bench.round(prompts) for _ in range(ROUNDS)]
    token_ids = split_token_ids(rounds)
    main = median_round(rounds)
    sizes = []
    for batch_size in ((1, 8, 16, 32, 64) if sweep else ()):
        batch = (prompts * (batch_size // len(prompts) + 1))[:batch_size]
        sizes.append(bench.round(batch))
        sizes[-1].pop("token_ids")
    report = {"workload": {**main, "rounds": rounds}, "sweep": sizes,
              "prompt_tokens_mean": statistics.mean(len(p) for p in prompts)}
    if return_tokens:
        report["token_ids"] = token_ids
    return report


def bench_server(model: str, dtype: str, device: str, prompts_text: list[str], output_len: int) -> dict:
    bench = ServerRounds(model, dtype, device, output_len)
    try:
        bench.round(prompts_text[:2])  # warm-up
        rounds = [bench.round(prompts_text) for _ in range(ROUNDS)]
        return {**median_round(rounds), "rounds": rounds}
    finally:
        bench.close()


def bench_engine_and_server(model: str, dtype: str, device: str, prompts: list[list[int]], texts: list[str],
                            output_len: int, rounds: int = 5, stream_interval: int = 1,
                            client: str = "tritonclient", server_args: tuple[str, ...] = ()) -> dict:
    """The engine in-process and the server, round for round in turn (engine, server, engine,
    ..., server, engine), both kept warm: this shared VM's speed drifts by more than 10% within
    minutes, so the server / engine ratio is taken round by round, each server round against the
    mean of the engine rounds just before and just after it (which cancels a drift that is steady
    over the three), and the median of those ratios is the figure. client: "tritonclient"
    (Python, ServerRounds) or "perf_analyzer" (C++, perf_analyzer_rounds)."""
    engine = EngineRounds(model, dtype, device, output_len)
    if client == "perf_analyzer":
        server = PerfAnalyzerRounds(model, dtype, device, output_len, stream_interval, server_args)
    else:
        server = ServerRounds(model, dtype, device, output_len, stream_interval, server_args)
    try:
        server.round(texts[:2])  # warm-up
        engine_rounds, server_rounds = [], []
        for _ in range(rounds):
            engine_rounds.append(engine.round(prompts))
            server_rounds.append(server.round(texts))
        engine_rounds.append(engine.round(prompts))
    finally:
        server.close()
    token_ids = split_token_ids(engine_rounds)
    engine_tok_s = [e["output_tokens_per_s"] for e in engine_rounds]
    ratios = [s["output_tokens_per_s"] / ((engine_tok_s[i] + engine_tok_s[i + 1]) / 2)
              for i, s in enumerate(server_rounds)]
    return {"engine": {**median_round(engine_rounds), "rounds": engine_rounds},
            "server": {**median_round(server_rounds), "rounds": server_rounds},
            "server_over_engine": {"median": statistics.median(ratios), "pairs": [round(r, 3) for r in ratios]},
            "token_ids": token_ids}


def decode_step_ms(model: str, dtype: str, device: str, context: int, batch: int = 32, steps: int = 16) -> float:
    """The engine's decode step (median ms) for `batch` sequences holding `context` tokens each."""
    return DecodeSteps(model, dtype, device, context, batch, steps).measure(steps)


def long_context_ratio(model: str, dtype: str, device: str, contexts: tuple[int, int] = (256, 1024),
                       batch: int = 32, steps: int = 8, rounds: int = 5) -> dict:
    """The decode step at the long context against the short one, measured in turn (short, long,
    short, ...) with both engines kept warm, as bench_engine_and_server does: this VM's speed
    drifts within seconds, and two steps measured minutes apart made the ratio swing by 30%.
    Returns each context's median step and the median of the rounds' ratios."""
    short, long = (DecodeSteps(model, dtype, device, c, batch, steps * rounds) for c in contexts)
    pairs = [(short.measure(steps), long.measure(steps)) for _ in range(rounds)]
    return {str(contexts[0]): statistics.median(a for a, _ in pairs),
            str(contexts[1]): statistics.median(b for _, b in pairs),
            "ratio": statistics.median(b / a for a, b in pairs),
            "pairs": [[round(a, 1), round(b, 1)] for a, b in pairs]}


def bench_hf(model: str, dtype: str, prompts: list[list[int]], output_len: int, device: str = "cpu") -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    out: dict = {}
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    hf.generate_batch(inputs=[prompts[0][:16]], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0))
    start = time.perf_counter()
    results = hf.generate_batch(inputs=prompts, generation_config=config)
    wall = time.perf_counter() - start
    generated = sum(len(r.generated_tokens) for r in results.values())
    out["generate_batch"] = {"seconds": wall, "output_tokens_per_s": generated / wall, "output_tokens": generated}

    # Raw forward loop: all prompts padded to the same length (they are ~equal), KV cache, greedy.
    width = min(len(p) for p in prompts)
    ids = torch.tensor([p[:width] for p in prompts], device=device)
    with torch.inference_mode():
        start = time.perf_counter()
        cache = DynamicCache()
        logits = hf(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(output_len - 1):
            t = time.perf_counter()
            logits = hf(input_ids=logits.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True).logits[:, -1]
            steps.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
    out["raw_forward"] = {"seconds": wall, "output_tokens_per_s": len(prompts) * output_len / wall,
                          "prefill_seconds": prefill, "decode_step_ms": 1000 * statistics.mean(steps)}
    return out

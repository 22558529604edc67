"""Multi-turn TTFT with and without the host KV offload tier (kv_offload_host_gb), one BOTH
engine in this process: 16 conversations x 4 turns, each turn adding TURN_TOKENS new tokens to
the history (and the previous answers), greedy. The pool holds about a quarter of all the
conversations' tokens, and the conversations take turns (turn 1 of all, then turn 2 of all, ...),
so between two turns of one conversation the other 15 evict it from the pool.

    python bench/kv_offload_multiturn.py [--model DIR] [--host-gb 1]

TTFT here is one request's time from add_request to its first token, requests one at a time.
Prints TTFT p50/p99 per turn for both runs and whether their texts are identical.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sequence import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERSATIONS, TURNS, TURN_TOKENS, OUTPUT_TOKENS, BLOCK = 16, 4, 200, 16, 16


def pool_blocks() -> int:
    per_conversation = TURNS * (TURN_TOKENS + OUTPUT_TOKENS)
    return CONVERSATIONS * per_conversation // BLOCK // 4


def run(model: str, host_gb: float, seed: int = 0):
    """{turn: [TTFT seconds]}, every answer's tokens, and the engine's last stats."""
    engine = LLMEngine(EngineConfig(model_path=model, dtype="float32", kv_block_size=BLOCK,
                                    kv_cache_blocks=pool_blocks(), max_model_len=2048, max_num_seqs=4,
                                    max_num_batched_tokens=2048, admission_window_ms=0,
                                    kv_offload_host_gb=host_gb))
    rng = random.Random(seed)
    vocab = engine.runner.vocab_size
    history = [[] for _ in range(CONVERSATIONS)]
    ttft, answers = {t: [] for t in range(1, TURNS + 1)}, []
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    for turn in range(1, TURNS + 1):
        for c in range(CONVERSATIONS):
            history[c] += [rng.randrange(1, vocab) for _ in range(TURN_TOKENS)]
            start, first, out = time.perf_counter(), None, []
            engine.add_request(f"c{c}t{turn}", history[c], params)
            while engine.has_work():
                for o in engine.step():
                    assert o.error is None, o.error
                    first = first or time.perf_counter()
                    out += o.token_ids
            ttft[turn].append(first - start)
            answers.append(out)
            history[c] += out
    return ttft, answers, engine.stats()


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--host-gb", type=float, default=1.0)
    args = ap.parse_args()
    print(f"pool {pool_blocks()} blocks of {BLOCK} tokens; {CONVERSATIONS} conversations x {TURNS} turns "
          f"of {TURN_TOKENS} new tokens + {OUTPUT_TOKENS} output tokens")
    plain, plain_answers, _ = run(args.model, 0.0)
    tiered, tiered_answers, stats = run(args.model, args.host_gb)
    print("| turn | TTFT p50 without tier (ms) | p99 | with host tier p50 (ms) | p99 |")
    print("|---|---|---|---|---|")
    for turn in range(1, TURNS + 1):
        a, b = plain[turn], tiered[turn]
        print(f"| {turn} | {statistics.median(a) * 1e3:.0f} | {p99(a) * 1e3:.0f} | "
              f"{statistics.median(b) * 1e3:.0f} | {p99(b) * 1e3:.0f} |")
    later_plain = [t for turn in range(2, TURNS + 1) for t in plain[turn]]
    later_tiered = [t for turn in range(2, TURNS + 1) for t in tiered[turn]]
    ratio = statistics.median(later_tiered) / statistics.median(later_plain)
    tier = stats.kv_tiers[0]
    print(f"turns 2-{TURNS} median TTFT: {statistics.median(later_plain) * 1e3:.0f} ms without, "
          f"{statistics.median(later_tiered) * 1e3:.0f} ms with the tier ({ratio:.2f}x); identical text: "
          f"{plain_answers == tiered_answers}")
    print(f"tier: {tier.hit_tokens} hit tokens, {tier.saved_bytes / 2**20:.0f} MiB saved, "
          f"{tier.loaded_bytes / 2**20:.0f} MiB loaded, {tier.copy_seconds * 1e3:.0f} ms copying, "
          f"{tier.used_bytes / 2**20:.0f} MiB held; pool prefix hits {stats.prefix_cache_hits} tokens")


if __name__ == "__main__":
    main()

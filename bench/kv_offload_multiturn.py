"""Multi-turn TTFT through a served BOTH engine, with and without the KV offload tiers
(kv_offload_host_gb, kv_offload_disk_*): 16 conversations x 4 turns, each turn adding about
TURN_TOKENS new tokens of text to the history (and the previous answers), greedy. The pool holds
about a quarter of all the conversations' tokens, and the conversations take turns (turn 1 of
all, then turn 2 of all, ...), so between two turns of one conversation the other 15 evict it.

    python bench/kv_offload_multiturn.py [--model DIR] [--host-gb 1] [--disk-gb 1] [--setups none,host,disk]

One pdserve node per setup (the engine pinned to cpu:0); requests one at a time through
tritonclient's gRPC stream, TTFT = the first streamed token. Prints TTFT p50/p99 per turn for
every setup, turns 2-4's median against no tier, whether the texts are identical, and the tier
metrics (pdserve_kv_offload_*).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile

from kv_transfer import cpu_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERSATIONS, TURNS, TURN_TOKENS, OUTPUT_TOKENS, BLOCK = 16, 4, 200, 16, 16


def pool_blocks() -> int:
    per_conversation = TURNS * (TURN_TOKENS + OUTPUT_TOKENS)
    return CONVERSATIONS * per_conversation // BLOCK // 4


def turn_texts(model: str, seed: int = 0) -> list[list[str]]:
    """[conversation][turn] the new text of each turn, about TURN_TOKENS tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    return [[tokenizer.decode([rng.choice(vocab) for _ in range(TURN_TOKENS)]) for _ in range(TURNS)]
            for _ in range(CONVERSATIONS)]


def run(model: str, setup: str, tiers: dict, texts: list[list[str]]) -> dict:
    """{turn: [TTFT s]}, every answer's text, and the tier metrics after the run."""
    from pdserve_clients import LLMClient
    from pdserve_testing.harness import PdServer, config_text

    repo = tempfile.mkdtemp(prefix=f"pdserve-bench-multiturn-{setup}-")
    os.makedirs(os.path.join(repo, "m"))
    os.symlink(os.path.abspath(model), os.path.join(repo, "m", "1"))
    with open(os.path.join(repo, "m", "config.pbtxt"), "w") as f:
        f.write(config_text(role_groups=(("BOTH", "cpu:0"),), max_model_len=2048, kv_block_size=BLOCK,
                            kv_cache_blocks=pool_blocks(), max_num_seqs=4, max_num_batched_tokens=2048, **tiers))
    server = PdServer(repo, mode="none").start()
    client = None
    try:
        server.wait_ready("m", timeout=300)
        client = LLMClient(server.url, "m")
        params = {"max_tokens": OUTPUT_TOKENS, "temperature": 0, "ignore_eos": True}
        client.stream_all("warm-up " * 50, timeout=600, **params)
        history = [""] * CONVERSATIONS
        ttft, answers = {t: [] for t in range(1, TURNS + 1)}, []
        for turn in range(1, TURNS + 1):
            for c in range(CONVERSATIONS):
                history[c] += texts[c][turn - 1]
                r = client.stream_all(history[c], timeout=600, **params)
                ttft[turn].append(r.ttft_s)
                answers.append(r.text)
                history[c] += r.text
        metrics = {}
        for tier in ("host", "disk"):
            value = lambda name: server.metric_value(name, model="m", tier=tier)  # noqa: E731
            if value("pdserve_kv_offload_capacity_bytes"):
                metrics[tier] = {"hit_tokens": value("pdserve_kv_offload_hits_total"),
                                 "saved_MiB": value("pdserve_kv_offload_saved_bytes_total") / 2**20,
                                 "loaded_MiB": value("pdserve_kv_offload_loaded_bytes_total") / 2**20,
                                 "copy_ms": value("pdserve_kv_offload_copy_seconds_total") * 1e3,
                                 "used_MiB": value("pdserve_kv_offload_used_bytes") / 2**20}
        return {"ttft": ttft, "answers": answers, "tiers": metrics,
                "pool_hits": server.metric_value("pdserve_prefix_cache_hits_total", model="m")}
    finally:
        if client is not None:
            client.close()
        server.stop()
        shutil.rmtree(repo, ignore_errors=True)


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--host-gb", type=float, default=1.0)
    ap.add_argument("--disk-gb", type=float, default=1.0)
    ap.add_argument("--disk-path", default=tempfile.gettempdir())
    ap.add_argument("--setups", default="none,host,disk")
    args = ap.parse_args()
    all_setups = {"none": {}, "host": {"kv_offload_host_gb": args.host_gb},
                  "disk": {"kv_offload_disk_path": args.disk_path, "kv_offload_disk_gb": args.disk_gb}}
    setups = args.setups.split(",")
    print(f"CPU: {cpu_summary()}")
    print(f"pool {pool_blocks()} blocks of {BLOCK} tokens; {CONVERSATIONS} conversations x {TURNS} turns "
          f"of about {TURN_TOKENS} new tokens + {OUTPUT_TOKENS} output tokens; served, one request at a time")
    texts = turn_texts(args.model)
    runs = {name: run(args.model, name, all_setups[name], texts) for name in setups}
    print("| turn | " + " | ".join(f"{name} p50 (ms) | p99" for name in setups) + " |")
    print("|---|" + "---:|---:|" * len(setups))
    for turn in range(1, TURNS + 1):
        cells = [f"{statistics.median(runs[n]['ttft'][turn]) * 1e3:.0f} | {p99(runs[n]['ttft'][turn]) * 1e3:.0f}"
                 for n in setups]
        print(f"| {turn} | " + " | ".join(cells) + " |")
    later = {n: statistics.median([t for turn in range(2, TURNS + 1) for t in runs[n]["ttft"][turn]]) for n in setups}
    base = setups[0]
    for name in setups[1:]:
        print(f"turns 2-{TURNS} median TTFT: {later[base] * 1e3:.0f} ms {base}, {later[name] * 1e3:.0f} ms {name} "
              f"({later[name] / later[base]:.2f}x); identical text: {runs[name]['answers'] == runs[base]['answers']}")
    for name in setups:
        print(f"{name}: pool prefix hits {runs[name]['pool_hits']:.0f} tokens; tiers {runs[name]['tiers']}")


if __name__ == "__main__":
    main()

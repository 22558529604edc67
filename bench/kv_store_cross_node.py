"""Cross-node prefix reuse through the cluster's KV store (kv_store: mooncake): two pdserve nodes
(two front ends, one etcd, one Mooncake master that node A starts and publishes), each serving
the demo model under its own name with its engine pinned to its own core. For each of ROUNDS
rounds: node B's TTFT for a fresh ~1500-token prompt (cold: nobody computed it), then node A
computes another fresh prompt and node B's TTFT for that one is measured (its blocks come from
the store). Prints the medians, their ratio, whether node B's text equals node A's for every
shared prompt, and the store metrics (pdserve_kv_offload_*{tier="store"}).

    python bench/kv_store_cross_node.py [--model DIR] [--rounds 5] [--prompt-tokens 1500]

Requests one at a time through tritonclient's gRPC stream, greedy, TTFT = the first streamed token.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile

from kv_transfer import cpu_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK, OUTPUT_TOKENS = 16, 16


def prompt_texts(model: str, count: int, tokens: int, seed: int = 0) -> list[str]:
    """count texts of about `tokens` tokens each (random vocabulary, re-encoded to the length)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        text = tokenizer.decode([rng.choice(vocab) for _ in range(tokens)])
        texts.append(tokenizer.decode(tokenizer.encode(text)[:tokens]))
    return texts


def float32_block_bytes(model: str) -> int:
    """One KV block of all layers: layers x K/V x tokens x kv heads x head dim x 4 bytes."""
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * BLOCK * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    args = ap.parse_args()

    from pdserve_clients import LLMClient
    from pdserve_testing.harness import PdServer, config_text
    from pdserve_testing.waits import wait_until

    from pdserve.common.etcd_server import EtcdProcess

    print(f"CPU: {cpu_summary()}")
    block_bytes = float32_block_bytes(args.model)
    texts = prompt_texts(args.model, 2 * args.rounds + 1, args.prompt_tokens)
    work = tempfile.mkdtemp(prefix="pdserve-bench-kvstore-")
    etcd = EtcdProcess(data_dir=os.path.join(work, "etcd")).start()
    nodes, clients = {}, {}
    params = {"max_tokens": OUTPUT_TOKENS, "temperature": 0, "ignore_eos": True}
    try:
        for name, core in (("a", "cpu:0"), ("b", "cpu:1")):   # B starts after A: it finds A's master in etcd
            os.makedirs(os.path.join(work, name, name))
            os.symlink(os.path.abspath(args.model), os.path.join(work, name, name, "1"))
            with open(os.path.join(work, name, name, "config.pbtxt"), "w") as f:
                f.write(config_text(role_groups=(("BOTH", core),), max_model_len=2048, kv_block_size=BLOCK,
                                    kv_cache_blocks=1024, max_num_seqs=4, max_num_batched_tokens=2048,
                                    kv_store="mooncake", kv_store_gb=1))
            nodes[name] = PdServer(os.path.join(work, name), mode="none", load_models=(name,),
                                   extra_args=["--etcd-endpoints", etcd.endpoint, "--node-name", name]).start()
            nodes[name].wait_ready(name, timeout=300)
            clients[name] = LLMClient(nodes[name].url, name)
        a, b = nodes["a"], nodes["b"]
        for name in "ab":
            clients[name].stream_all(texts[-1], timeout=600, **params)      # warm-up (and into the store)
        saved = lambda: a.metric_value("pdserve_kv_offload_saved_bytes_total", tier="store")  # noqa: E731
        cold, warm, same, lengths = [], [], [], []
        for r in range(args.rounds):
            fresh, shared = texts[2 * r], texts[2 * r + 1]
            result = clients["b"].stream_all(fresh, timeout=600, **params)
            cold.append(result.ttft_s)
            lengths.append(result.num_input_tokens)
            before = saved()
            on_a = clients["a"].stream_all(shared, timeout=600, **params)
            full_blocks = (on_a.num_input_tokens - 1) // BLOCK
            # node A's writer has put the prompt's blocks (its store metric counts them)
            wait_until(lambda: saved() - before >= full_blocks * block_bytes, "node A's puts", 60)
            on_b = clients["b"].stream_all(shared, timeout=600, **params)
            warm.append(on_b.ttft_s)
            same.append(on_b.text == on_a.text)
        metric = lambda node, name: node.metric_value(f"pdserve_kv_offload_{name}", tier="store")  # noqa: E731
        print(f"prompt tokens {min(lengths)}-{max(lengths)}, {OUTPUT_TOKENS} output tokens, {args.rounds} rounds; "
              f"engines pinned: node A cpu:0, node B cpu:1")
        print("| node B TTFT | p50 (ms) | min | max |")
        print("|---|---:|---:|---:|")
        for label, values in (("cold (nobody computed it)", cold), ("computed on node A first", warm)):
            print(f"| {label} | {statistics.median(values) * 1e3:.0f} | {min(values) * 1e3:.0f} | "
                  f"{max(values) * 1e3:.0f} |")
        print(f"ratio {statistics.median(warm) / statistics.median(cold):.2f}x; identical greedy text: {all(same)}")
        print(f"node B store hits {metric(b, 'hits_total'):.0f} tokens, loaded "
              f"{metric(b, 'loaded_bytes_total') / 2**20:.0f} MiB in {metric(b, 'copy_seconds_total') * 1e3:.0f} ms "
              f"(its puts included); node A saved {metric(a, 'saved_bytes_total') / 2**20:.0f} MiB")
    finally:
        for c in clients.values():
            c.close()
        for n in nodes.values():
            n.stop()
        etcd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

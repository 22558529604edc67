"""Tensor parallelism on the CPU: one instance over two cores against one device, one server.

Setups (models of one pdserve server, the same weights, served in turn round by round):
  tp1_core:  tensor_parallel_size 1 on cpu:0 (one core)
  tp1_cores: tensor_parallel_size 1 on cpu (both cores, one OpenMP team)
  tp2:       tensor_parallel_size 2 on cpu:0 + cpu:1 (two processes, gloo all-reduces)
Load: `--batch` concurrent greedy streams of `--prompt-len` random tokens and `--output-len`
tokens (ignore_eos), plus one lone stream (its time per output token). Rounds alternate setups,
the median round is reported (the VM's speed drifts).

    python bench/tensor_parallel.py [--rounds 3 --batch 8 --prompt-len 128 --output-len 64]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "clients")]

from kv_transfer import cpu_summary  # noqa: E402

SETUPS = {"tp1_core": ('"cpu:0"', 1), "tp1_cores": ('"cpu"', 1), "tp2": ('"cpu:0", "cpu:1"', 2)}


def write_repo(model: str) -> str:
    from pdserve_testing.harness import config_text
    repo = tempfile.mkdtemp(prefix="pdserve-bench-tp-")
    for name, (devices, size) in SETUPS.items():
        os.makedirs(os.path.join(repo, name))
        os.symlink(os.path.abspath(model), os.path.join(repo, name, "1"))
        text = config_text(max_model_len=1024, kv_cache_blocks=1024, max_num_seqs=64, enable_prefix_caching="false")
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(text.replace('devices: [ "cpu" ]', f"devices: [ {devices} ] tensor_parallel_size: {size}"))
    return repo


def one_round(url: str, model: str, prompts: list[str], output_len: int) -> dict:
    from pdserve_clients import LLMClient
    params = {"max_tokens": output_len, "temperature": 0, "ignore_eos": True}
    lone = LLMClient(url, model)
    tpot = lone.stream_all(prompts[0], timeout=600, **params).tpot_s
    lone.close()
    tokens: list[int] = []

    def stream(text: str) -> None:
        client = LLMClient(url, model)
        tokens.append(client.stream_all(text, timeout=600, **params).num_output_tokens)
        client.close()
    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"output_tokens_per_s": sum(tokens) / wall, "lone_tpot_ms": 1000 * tpot}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from pdserve_testing.harness import PdServer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rng = random.Random(0)
    prompts = [tokenizer.decode([rng.randrange(1, len(tokenizer)) for _ in range(args.prompt_len)])
               for _ in range(args.batch)]
    server = PdServer(write_repo(args.model), mode="poll").start()
    try:
        for name in SETUPS:
            server.wait_ready(name, timeout=300)
            one_round(server.url, name, prompts[:2], 4)   # warm-up
        rounds: dict[str, list[dict]] = {name: [] for name in SETUPS}
        for _ in range(args.rounds):
            for name in SETUPS:
                rounds[name].append(one_round(server.url, name, prompts, args.output_len))
    finally:
        server.stop()
    report = {"cpu": cpu_summary(), "batch": args.batch, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "setups": {name: {key: round(statistics.median(r[key] for r in rs), 2) for key in rs[0]} | {"rounds": rs}
                         for name, rs in rounds.items()}}
    print(json.dumps(report, indent=1))
    for name, figures in report["setups"].items():
        print(f"{name:10s} {figures['output_tokens_per_s']:8.1f} tok/s   lone TPOT {figures['lone_tpot_ms']:6.1f} ms"
              f"   ({report['cpu']})")


if __name__ == "__main__":
    main()

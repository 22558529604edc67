"""Where disaggregation pays: TTFT of a prompt prefilled on the DECODE engine (local) against
handed off to the PREFILL engine, by uncached prompt length, on the demo PD, beside aggregated.

Setups (each a pdserve node on the demo model, engines pinned one per core):
  handoff:    1 PREFILL + 1 DECODE, max_local_prefill_tokens 0 (every prompt handed off)
  local:      1 PREFILL + 1 DECODE, max_local_prefill_tokens above every probe (none handed off)
  default:    1 PREFILL + 1 DECODE with the default max_local_prefill_tokens
  aggregated: 2 BOTH engines, least-load routing
While BACKGROUND streams decode (so a local prefill shares the decode engine's steps, as it
would in service), probe prompts of each length (fresh random text: nothing cached) are sent
one at a time; TTFT = first streamed token. Beside it, the background streams' gaps between
tokens while the probes of a length run (p99 ITL): what a local prefill costs the decodes. The
default is the longest probe length whose local prefill is faster than the handoff and keeps that
p99 ITL within TPOT_SLO_MS (the SLO of issue 30's capacity sweep). pdserve_prefills_total{where}
shows where the probes ran.

    python bench/local_prefill.py [--lengths 16,32,64,128,256,512,1024] [--repeat 5] [--setups ...]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import threading
import time

from kv_transfer import cpu_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PD, AGGREGATED = (("PREFILL", "cpu:0"), ("DECODE", "cpu:1")), (("BOTH", "cpu:0"), ("BOTH", "cpu:1"))
BACKGROUND, BACKGROUND_TOKENS = 8, 1200
TPOT_SLO_MS = 50.0


def run(model: str, name: str, groups, params: dict, probes: dict[int, list[str]], background: list[str],
        warmups: list[str]) -> dict:
    """{length: [TTFT s]} for the probes, {length: [background gaps s]} while they ran, and the
    prefills metric, under a decoding background."""
    from pdserve_clients import LLMClient
    from pdserve_testing.harness import PdServer, config_text

    repo = tempfile.mkdtemp(prefix=f"pdserve-bench-local-{name}-")
    os.makedirs(os.path.join(repo, "m"))
    os.symlink(os.path.abspath(model), os.path.join(repo, "m", "1"))
    with open(os.path.join(repo, "m", "config.pbtxt"), "w") as f:
        f.write(config_text(role_groups=groups, max_model_len=2048, kv_cache_blocks=2048, max_num_seqs=64, **params))
    server = PdServer(repo, mode="none").start()
    stop = threading.Event()
    token_times: list[list[float]] = [[] for _ in background]
    try:
        server.wait_ready("m", timeout=300)
        greedy = {"temperature": 0, "ignore_eos": True}
        warm = LLMClient(server.url, "m")
        for text in background[:2]:
            warm.stream_all(text, timeout=600, max_tokens=2, **greedy)
        started = threading.Barrier(BACKGROUND + 1)

        def decode_forever(text: str, times: list[float]) -> None:
            client = LLMClient(server.url, "m")
            try:
                first = True
                while not stop.is_set():
                    times.append(float("nan"))      # a new stream: no gap across streams
                    for _ in client.stream(text, timeout=600, max_tokens=BACKGROUND_TOKENS, **greedy):
                        times.append(time.monotonic())
                        if first:
                            first = False
                            started.wait()
                        if stop.is_set():
                            break
            finally:
                client.close()

        threads = [threading.Thread(target=decode_forever, args=(t, times), daemon=True)
                   for t, times in zip(background, token_times)]
        for th in threads:
            th.start()
        started.wait(timeout=300)
        for text in warmups:        # the first steps mixing a prompt with decodes are slower: not measured
            warm.stream_all(text, timeout=600, max_tokens=1, **greedy)
        ttft, windows = {}, {}
        for length, texts in probes.items():
            start = time.monotonic()
            ttft[length] = [warm.stream_all(text, timeout=600, max_tokens=1, **greedy).ttft_s for text in texts]
            windows[length] = (start, time.monotonic())
        stop.set()
        for th in threads:
            th.join(timeout=120)
        warm.close()
        where = {w: server.metric_value("pdserve_prefills_total", model="m", where=w) for w in ("local", "remote")}
        gaps = {n: [b - a for times in token_times for a, b in zip(times, times[1:]) if lo <= b <= hi and a == a]
                for n, (lo, hi) in windows.items()}
        return {"ttft": ttft, "gaps": gaps, "prefills": where}
    finally:
        stop.set()
        server.stop()
        shutil.rmtree(repo, ignore_errors=True)


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))] if values else float("nan")


def main() -> None:
    from transformers import AutoTokenizer

    from pdserve.cluster.router import DEFAULT_MAX_LOCAL_PREFILL_TOKENS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--lengths", default="16,32,64,128,256,512,1024")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--setups", default="handoff,local,default,aggregated")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    setups = {"handoff": (PD, {"max_local_prefill_tokens": 0}),
              "local": (PD, {"max_local_prefill_tokens": 100_000}),
              "default": (PD, {"max_local_prefill_tokens": DEFAULT_MAX_LOCAL_PREFILL_TOKENS}),  # the harness pins 0
              "aggregated": (AGGREGATED, {})}
    names = args.setups.split(",")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(0)

    def text(n: int) -> str:
        """Random text of exactly n tokens as the server tokenizes it."""
        while True:
            ids = tokenizer.encode(tokenizer.decode([rng.choice(vocab) for _ in range(n + 16)]),
                                   add_special_tokens=False)
            out = tokenizer.decode(ids[:n])
            if len(tokenizer.encode(out, add_special_tokens=False)) == n:
                return out
    background = [text(64) for _ in range(BACKGROUND)]
    warmups = [text(16) for _ in range(3)]
    probes = {n: [text(n) for _ in range(args.repeat)] for n in lengths}
    print(f"CPU: {cpu_summary()}")
    print(f"demo model float32; {BACKGROUND} background streams decoding; probes one at a time, "
          f"{args.repeat} per length, fresh text; default max_local_prefill_tokens {DEFAULT_MAX_LOCAL_PREFILL_TOKENS}")
    runs = {name: run(args.model, name, *setups[name], probes, background, warmups) for name in names}
    print("| uncached tokens | " + " | ".join(f"{n} TTFT p50 / background ITL p99 (ms)" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for n in lengths:
        print(f"| {n} | " + " | ".join(f"{statistics.median(runs[s]['ttft'][n]) * 1e3:.0f} / "
                                       f"{p99(runs[s]['gaps'][n]) * 1e3:.0f}" for s in names) + " |")
    for s in names:
        print(f"{s}: prefills {runs[s]['prefills']}")
    if "local" in runs and "handoff" in runs:
        pays = [n for n in lengths if statistics.median(runs["local"]["ttft"][n])
                <= statistics.median(runs["handoff"]["ttft"][n]) and p99(runs["local"]["gaps"][n]) * 1e3 <= TPOT_SLO_MS]
        print(f"local prefill faster than the handoff with the decodes' p99 ITL <= {TPOT_SLO_MS:.0f} ms at: {pays}")


if __name__ == "__main__":
    main()

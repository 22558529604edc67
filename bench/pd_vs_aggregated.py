"""PD disaggregation against aggregated serving on the same cores, same load, one run.

Setups (each a pdserve node on the demo model, engines pinned one per core):
  pd:         1 PREFILL engine on cpu:0 + 1 DECODE engine on cpu:1 (KV over Mooncake TCP)
  aggregated: 2 BOTH engines on cpu:0 and cpu:1, least-load routing
Load: Poisson arrivals; most prompts short, some long; greedy, fixed output length.
Reports a lone long prompt's TTFT (before the load), then under the load TTFT and TPOT p50/p99,
output tokens/s, goodput under the SLOs, and for PD the KV handoff's exposed time (what the
steps waited for their layer-wise writes after computing; bandwidth is bench/kv_transfer.py's).

    python bench/pd_vs_aggregated.py [--rate 1.0 --requests 60 --ttft-slo 2.0 --tpot-slo 0.05]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUPS = {"pd": (("PREFILL", "cpu:0"), ("DECODE", "cpu:1")),
          "aggregated": (("BOTH", "cpu:0"), ("BOTH", "cpu:1"))}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def workload(tokenizer, n: int, rate: float, long_share: float, short_len: int, long_len: int, seed: int = 0):
    """(arrival offset s, prompt text, is_long) for n requests, Poisson arrivals."""
    rng = random.Random(seed)
    vocab = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        is_long = rng.random() < long_share
        ids = [rng.choice(vocab) for _ in range(long_len if is_long else short_len)]
        out.append((t, tokenizer.decode(ids), is_long))
    return out


def run_setup(name: str, model: str, requests, output_len: int, lone_prompts: list[str]) -> dict:
    from pdserve_testing.harness import PdServer, config_text, inputs
    from pdserve_clients import LLMClient

    repo = tempfile.mkdtemp(prefix=f"pdserve-bench-{name}-")
    os.makedirs(os.path.join(repo, "m"))
    os.symlink(os.path.abspath(model), os.path.join(repo, "m", "1"))
    with open(os.path.join(repo, "m", "config.pbtxt"), "w") as f:
        f.write(config_text(role_groups=SETUPS[name], max_model_len=2048, kv_cache_blocks=2048, max_num_seqs=64))
    server = PdServer(repo, mode="none").start()
    try:
        server.wait_ready("m", timeout=300)
        params = {"max_tokens": output_len, "temperature": 0, "ignore_eos": True}
        # warm-up: one short and one long request
        for _, text, _ in requests[:2]:
            server.client.infer("m", inputs(text, False, params))
        # a lone long prompt (prompts of their own: no prefix-cache hits), median of three
        lone = []
        for text in lone_prompts:
            client = LLMClient(server.url, "m")
            lone.append(client.stream_all(text, timeout=600, **{**params, "max_tokens": 1}).ttft_s)
            client.close()
        results: list[dict] = [{} for _ in requests]

        def one(i: int, text: str):
            client = LLMClient(server.url, "m")
            try:
                r = client.stream_all(text, timeout=600, **params)
            except Exception as exc:
                results[i] = {"error": str(exc)}
                return
            finally:
                client.close()
            times = r.piece_times   # seconds from the stream's start, one per response with tokens
            gaps = [b - a for a, b in zip(times, times[1:])]
            results[i] = {"ttft": times[0], "e2e": times[-1], "tokens": r.num_output_tokens,
                          "tpot": (times[-1] - times[0]) / max(r.num_output_tokens - 1, 1),
                          "gaps": gaps, "max_gap": max(gaps, default=0.0)}

        threads = []
        t0 = time.perf_counter()
        for i, (offset, text, _) in enumerate(requests):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=one, args=(i, text))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        transfer = {"count": server.metric_value("pdserve_kv_transfer_seconds_count"),
                    "seconds": server.metric_value("pdserve_kv_transfer_seconds_sum"),
                    "bytes": server.metric_value("pdserve_kv_transfer_bytes_total")}
        return {"results": results, "wall": wall, "transfer": transfer, "lone_ttft": statistics.median(lone)}
    finally:
        server.stop()
        shutil.rmtree(repo, ignore_errors=True)


def summarize(run: dict, requests, ttft_slo: float, tpot_slo: float) -> dict:
    ok = [r for r in run["results"] if "ttft" in r]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok]
    good = [r for r in ok if r["ttft"] <= ttft_slo and r["tpot"] <= tpot_slo]
    out = {"lone_long_ttft_s": run["lone_ttft"], "requests": len(requests), "failed": len(requests) - len(ok),
           "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
           "tpot_p50_ms": 1000 * percentile(tpot, 50), "tpot_p99_ms": 1000 * percentile(tpot, 99),
           "itl_p50_ms": 1000 * percentile([g for r in ok for g in r["gaps"]], 50),
           "itl_p99_ms": 1000 * percentile([g for r in ok for g in r["gaps"]], 99),
           "max_stall_ms": 1000 * max(r["max_gap"] for r in ok),
           "output_tokens_per_s": sum(r["tokens"] for r in ok) / run["wall"],
           "goodput_share": len(good) / len(requests), "goodput_req_per_s": len(good) / run["wall"]}
    t = run["transfer"]
    if t["count"]:
        mean_ttft_short = statistics.mean(r["ttft"] for r, (_, _, long) in zip(run["results"], requests) if "ttft" in r)
        out.update({"kv_transfers": int(t["count"]), "kv_transfer_exposed_mean_ms": 1000 * t["seconds"] / t["count"],
                    "kv_transfer_mean_MiB": t["bytes"] / t["count"] / 2**20,
                    "kv_transfer_exposed_share_of_mean_ttft": (t["seconds"] / t["count"]) / mean_ttft_short})
    return out


def _raw_receiver(q, done, nbytes):
    import torch
    from mooncake.engine import TransferEngine
    te = TransferEngine()
    te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    pool = torch.zeros(nbytes // 4)
    te.register_memory(pool.data_ptr(), nbytes)
    q.put((f"127.0.0.1:{te.get_rpc_port()}", pool.data_ptr()))
    done.wait()


def raw_transport_MBps(nbytes: int = 256 * 2**20, chunk: int = 2**20) -> float:
    """Mooncake TCP write bandwidth between two processes on this host, in chunks like KV blocks."""
    import torch
    from mooncake.engine import TransferEngine
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_raw_receiver, args=(q, done, nbytes))
    proc.start()
    session, base = q.get(timeout=60)
    te = TransferEngine()
    te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    src = torch.randn(nbytes // 4)
    te.register_memory(src.data_ptr(), nbytes)
    offsets = list(range(0, nbytes, chunk))
    te.batch_transfer_sync_write(session, [src.data_ptr()], [base], [chunk])  # handshake
    start = time.perf_counter()
    te.batch_transfer_sync_write(session, [src.data_ptr() + o for o in offsets], [base + o for o in offsets],
                                 [chunk] * len(offsets))
    seconds = time.perf_counter() - start
    done.set()
    proc.join()
    return nbytes / seconds / 1e6


def plot(summary: dict, runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, run in runs.items():
        ok = [r for r in run["results"] if "ttft" in r]
        for ax, key, scale in ((axes[0], "ttft", 1.0), (axes[1], "tpot", 1000.0)):
            values = sorted(r[key] * scale for r in ok)
            ax.plot(values, [i / len(values) for i in range(1, len(values) + 1)], label=name)
    axes[0].set(title="TTFT distribution", xlabel="seconds", ylabel="share of requests")
    axes[1].set(title="TPOT distribution (per request)", xlabel="ms per token")
    names = list(summary)
    x = range(len(names))
    axes[2].bar([i - 0.2 for i in x], [summary[n]["tpot_p99_ms"] for n in names], width=0.4, label="p99 TPOT (ms)")
    axes[2].bar([i + 0.2 for i in x], [summary[n]["goodput_share"] * 100 for n in names], width=0.4,
                label="goodput (% of requests)")
    axes[2].set_xticks(list(x), names)
    axes[2].set(title="PD against aggregated")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--long-share", type=float, default=0.2)
    ap.add_argument("--short-len", type=int, default=64)
    ap.add_argument("--long-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    ap.add_argument("--tpot-slo", type=float, default=0.05, help="seconds per output token")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--tag", default="", help="suffix of the output files")
    args = ap.parse_args()

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    requests = workload(tokenizer, args.requests, args.rate, args.long_share, args.short_len, args.long_len)
    runs, summary = {}, {}
    for name in ("aggregated", "pd"):
        lone = [text for _, text, _ in workload(tokenizer, 3, 1.0, 1.0, args.short_len, args.long_len,
                                                 seed=100)]
        runs[name] = run_setup(name, args.model, requests, args.output_len, lone)
        summary[name] = summarize(runs[name], requests, args.ttft_slo, args.tpot_slo)
        print(name, json.dumps(summary[name], indent=1), flush=True)
    summary["raw_transport_MBps"] = raw_transport_MBps()
    summary["pd_over_aggregated_tpot_p99"] = summary["pd"]["tpot_p99_ms"] / summary["aggregated"]["tpot_p99_ms"]
    summary["pd_over_aggregated_itl_p99"] = summary["pd"]["itl_p99_ms"] / summary["aggregated"]["itl_p99_ms"]
    summary["pd_over_aggregated_lone_ttft"] = summary["pd"]["lone_long_ttft_s"] / summary["aggregated"]["lone_long_ttft_s"]
    summary["pd_over_aggregated_goodput"] = summary["pd"]["goodput_share"] / max(summary["aggregated"]["goodput_share"], 1e-9)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"pd_vs_aggregated{args.tag}.json"), "w") as f:
        json.dump({"args": vars(args), "summary": summary, "runs": runs}, f, indent=1)
    plot({k: summary[k] for k in ("aggregated", "pd")}, runs, os.path.join(args.out, f"pd_vs_aggregated{args.tag}.png"))
    print(f"raw transport: {summary['raw_transport_MBps']:.0f} MB/s; "
          f"p99 TPOT PD/aggregated: {summary['pd_over_aggregated_tpot_p99']:.2f}; "
          f"p99 ITL PD/aggregated: {summary['pd_over_aggregated_itl_p99']:.2f}; "
          f"lone long TTFT PD/aggregated: {summary['pd_over_aggregated_lone_ttft']:.2f}; "
          f"goodput PD/aggregated: {summary['pd_over_aggregated_goodput']:.2f}")


if __name__ == "__main__":
    main()

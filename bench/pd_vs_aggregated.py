"""Capacity of PD disaggregation, AUTO roles and aggregated serving on the same two cores, one run.

Setups (each a pdserve node on the demo model, engines pinned one per core, engine defaults):
  aggregated: 2 BOTH engines on cpu:0 and cpu:1
  pd:         1 PREFILL engine on cpu:0 + 1 DECODE engine on cpu:1 (KV over Mooncake TCP)
  auto:       2 AUTO engines on cpu:0 and cpu:1 (they start PREFILL + DECODE; the planner moves them)
Load (issue 30): Poisson arrivals at each rate of the sweep, 60 requests per rate (the same ones
for every setup), 20% of prompts 1024 tokens and the rest 64 (random text: no prefix-cache hits),
64 greedy output tokens.
A request meets the SLO when its TTFT <= 2 s and its TPOT <= 50 ms; a setup's capacity is the
highest rate of the sweep at which at least 90% of the requests meet it. Each setup's server runs
the whole sweep; the servers are up together and take turns at each rate, lowest rate first (so
AUTO's planner sees the load grow). By default a setup's sweep stops at its first rate below 90%
(--full runs every rate). A request that fails (an error, or fewer tokens than asked) counts
against the SLO and is reported: AUTO's role switches must lose none.

    python bench/pd_vs_aggregated.py [--rates 2,4,8,12,16,24 --requests 60 --setups aggregated,pd,auto]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import threading
import time

from kv_transfer import cpu_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUPS = {"aggregated": (("BOTH", "cpu:0"), ("BOTH", "cpu:1")),
          "pd": (("PREFILL", "cpu:0"), ("DECODE", "cpu:1")),
          "auto": (("AUTO", "cpu:0"), ("AUTO", "cpu:1"))}
RATES = (2, 4, 8, 12, 16, 24)
MEETS = 0.9   # share of requests within the SLO for a rate to count


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def workload(tokenizer, n: int, rate: float, long_share: float, short_len: int, long_len: int, seed: int):
    """(arrival offset s, prompt text) for n requests, Poisson arrivals."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        length = long_len if rng.random() < long_share else short_len
        out.append((t, tokenizer.decode([rng.choice(vocab) for _ in range(length)])))
    return out


def send(url: str, requests, output_len: int) -> tuple[list[dict], float]:
    """Sends the requests at their arrival times, one stream each; per request its TTFT and TPOT
    (or its error) and the wall time of the whole load."""
    from pdserve_clients import LLMClient

    results: list[dict] = [{} for _ in requests]
    params = {"max_tokens": output_len, "temperature": 0, "ignore_eos": True}

    def one(i: int, text: str) -> None:
        client = LLMClient(url, "m")
        try:
            r = client.stream_all(text, timeout=600, **params)
            if r.num_output_tokens != output_len:
                results[i] = {"error": f"{r.num_output_tokens}/{output_len} tokens ({r.finish_reason})"}
                return
            times = r.piece_times   # seconds from the stream's start, one per response with tokens
            results[i] = {"ttft": times[0], "tpot": (times[-1] - times[0]) / max(r.num_output_tokens - 1, 1)}
        except Exception as exc:
            results[i] = {"error": str(exc)}
        finally:
            client.close()

    threads = []
    t0 = time.perf_counter()
    for i, (offset, text) in enumerate(requests):
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        threads.append(threading.Thread(target=one, args=(i, text)))
        threads[-1].start()
    for th in threads:
        th.join()
    return results, time.perf_counter() - t0


def summarize(results: list[dict], wall: float, ttft_slo: float, tpot_slo: float) -> dict:
    ok = [r for r in results if "ttft" in r]
    ttft, tpot = [r["ttft"] for r in ok], [r["tpot"] for r in ok]
    good = sum(r["ttft"] <= ttft_slo and r["tpot"] <= tpot_slo for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3],
            "slo_share": good / len(results), "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
            "ttft_p99_s": percentile(ttft, 99), "tpot_p50_ms": 1000 * percentile(tpot, 50),
            "tpot_p90_ms": 1000 * percentile(tpot, 90), "tpot_p99_ms": 1000 * percentile(tpot, 99), "wall_s": wall}


def counters(server) -> dict:
    """The node's counters that tell where prompts ran and what the planner did (cumulative)."""
    return {"local_prefills": server.metric_value("pdserve_prefills_total", model="m", where="local"),
            "remote_prefills": server.metric_value("pdserve_prefills_total", model="m", where="remote"),
            "role_switches": server.metric_value("pdserve_role_switches_total", model="m"),
            "switches_abandoned": server.metric_value("pdserve_role_switches_abandoned_total", model="m")}


def start_setup(name: str, model: str):
    """The setup's server, ready and warmed up, and the repository folder it serves."""
    from pdserve.cluster.router import DEFAULT_MAX_LOCAL_PREFILL_TOKENS
    from pdserve_testing.harness import PdServer, config_text

    repo = tempfile.mkdtemp(prefix=f"pdserve-bench-{name}-")
    os.makedirs(os.path.join(repo, "m"))
    os.symlink(os.path.abspath(model), os.path.join(repo, "m", "1"))
    params = dict(max_model_len=2048, kv_cache_blocks=2048, max_num_seqs=64,
                  max_local_prefill_tokens=DEFAULT_MAX_LOCAL_PREFILL_TOKENS)   # config_text pins PD's to 0
    if name == "auto":
        params["kv_transport"] = "mooncake"
    with open(os.path.join(repo, "m", "config.pbtxt"), "w") as f:
        f.write(config_text(role_groups=SETUPS[name], **params))
    server = PdServer(repo, mode="none").start()
    server.wait_ready("m", timeout=300)
    return server, repo


def run_rate(name: str, server, rate: float, requests, args) -> dict:
    """One rate's load on the setup's server: the summary, its counters' increase and the
    engines' roles after it."""
    before = counters(server)
    results, wall = send(server.url, requests, args.output_len)
    after = counters(server)
    row = summarize(results, wall, args.ttft_slo, args.tpot_slo)
    row.update({k: after[k] - before[k] for k in after})
    row["roles"] = sorted(r["role"] for r in server.engines() if r["state"] == "ready")
    print(f"{name} {rate:g} req/s: {json.dumps(row)}", flush=True)
    return row


def sweep(names: list[str], model: str, loads: dict[float, list], args) -> dict[str, dict]:
    """Every setup's server up at once (an idle one costs the others next to nothing), then the
    rates lowest first, the setups taking turns within each rate in a rotating order: the
    machine's drift within minutes lands on every setup alike. A setup leaves the sweep after
    its first rate below MEETS (unless --full); AUTO's planner sees the load grow."""
    servers = {}
    try:
        for name in names:
            servers[name] = start_setup(name, model)
            send(servers[name][0].url, next(iter(loads.values()))[:4], 4)   # warm-up
        out: dict[str, dict] = {name: {} for name in names}
        for i, (rate, requests) in enumerate(loads.items()):
            turn = names[i % len(names):] + names[:i % len(names)]
            for name in turn:
                sweep_so_far = out[name]
                if sweep_so_far and min(r["slo_share"] for r in sweep_so_far.values()) < MEETS and not args.full:
                    continue
                sweep_so_far[rate] = run_rate(name, servers[name][0], rate, requests, args)
        return out
    finally:
        for server, repo in servers.values():
            server.stop()
            shutil.rmtree(repo, ignore_errors=True)


def capacity(sweep: dict) -> float:
    """The highest rate at which MEETS of the requests met the SLO, every lower rate too (0: none)."""
    best = 0.0
    for rate in sorted(sweep):
        if sweep[rate]["slo_share"] < MEETS:
            break
        best = rate
    return best


def table(sweeps: dict) -> str:
    lines = ["| setup | rate | within SLO | failed | TTFT p50 / p99 | TPOT p50 / p90 / p99 | prefills local / remote "
             "| roles after |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, sweep in sweeps.items():
        for rate, r in sweep.items():
            lines.append(f"| {name} | {rate:g} | {r['slo_share']:.0%} | {r['failed']} | {r['ttft_p50_s']:.2f} / "
                         f"{r['ttft_p99_s']:.2f} s | {r['tpot_p50_ms']:.0f} / {r['tpot_p90_ms']:.0f} / "
                         f"{r['tpot_p99_ms']:.0f} ms | {r['local_prefills']:.0f} / {r['remote_prefills']:.0f} | "
                         f"{' + '.join(r['roles'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--rates", default=",".join(map(str, RATES)))
    ap.add_argument("--requests", type=int, default=60, help="per rate")
    ap.add_argument("--long-share", type=float, default=0.2)
    ap.add_argument("--short-len", type=int, default=64)
    ap.add_argument("--long-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    ap.add_argument("--tpot-slo", type=float, default=0.05, help="seconds per output token")
    ap.add_argument("--full", action="store_true", help="every rate, past a setup's first miss")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--tag", default="", help="suffix of the output file")
    args = ap.parse_args()

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rates = [float(r) for r in args.rates.split(",")]
    loads = {rate: workload(tokenizer, args.requests, rate, args.long_share, args.short_len, args.long_len, seed=i)
             for i, rate in enumerate(rates)}   # the same requests for every setup
    machine = cpu_summary()
    print(f"machine: {machine}", flush=True)
    sweeps = sweep(args.setups.split(","), args.model, loads, args)
    caps = {name: capacity(sweep) for name, sweep in sweeps.items()}
    print(f"\nmachine: {machine}\n{table(sweeps)}\n")
    base = caps.get("aggregated")
    for name, cap in caps.items():
        ratio = f" ({cap / base:.2f}x aggregated)" if base and name != "aggregated" else ""
        lost = sum(r["failed"] for r in sweeps[name].values())
        print(f"capacity {name}: {cap:g} req/s{ratio}; failed requests {lost}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"pd_vs_aggregated{args.tag}.json"), "w") as f:
        json.dump({"args": vars(args), "machine": machine, "capacity": caps, "sweeps": sweeps}, f, indent=1)


if __name__ == "__main__":
    main()

"""Routing decision time at 10, 100 and 1000 engines of one model, per policy (no processes).

Records are made in memory and every engine has a last Stats answer with a random load. For
kv_aware the engines hold cached block hashes (blocks of 16 tokens) in one of two scenarios:
  affinity  what kv_aware itself brings about: every prompt starts with the same 128-token system
            prompt (8 blocks, held by every engine), each conversation's prefix lives on one
            engine (two for 30% of them) at a random depth, and every engine holds about 5
            conversations (about 330 hashes); 20% of the prompts are new conversations;
  scattered a heavier index: each engine holds 6 random conversations' prefixes (about 300
            hashes), so a prompt has about 12 holders at random depths (what round_robin
            would leave behind) and no common prefix.
A decision is Router.choose() for a 1500-token prompt (93 blocks; its hashes are computed before,
as the front end does in its tokenizer thread pool) plus Router.track()'s bookkeeping; between
two decisions one engine's Stats answer arrives (not timed), as polling does. Layouts:
aggregated (N BOTH engines) and PD (N/2 PREFILL + N/2 DECODE: two choices per decision).

    python bench/router_scale.py [--decisions 20000] [--baseline REV]

--baseline REV also times the router of git revision REV (its round_robin and least_load) in
the same run, over the same records and figures.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

from pdserve._proto import engine_pb2
from pdserve.cluster.load import LoadPlane
from pdserve.cluster.router import Router
from pdserve.common.block_hash import block_hashes
from pdserve.common.records import READY, EngineRecord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK = 16
PROMPT_TOKENS = 1500
SYSTEM_TOKENS = 128


class View:
    """The registry view the router reads: records, their generation, and (for an older router) engines()."""

    def __init__(self, records):
        self.records = {r.instance_id: r for r in records}
        self.generation = 1

    def engines(self, model, version=None, roles=("BOTH", "DECODE", "PREFILL"), states=(READY,)):
        return [r for r in self.records.values() if r.model == model and (version is None or r.version == version)
                and r.role in roles and r.state in states]


def records(n: int, layout: str) -> list[EngineRecord]:
    roles = ["BOTH"] * n if layout == "aggregated" else ["PREFILL"] * (n // 2) + ["DECODE"] * (n - n // 2)
    return [EngineRecord(instance_id=f"e{i:05d}", model="m", version="1", role=role, device="cpu", node=f"n{i // 8}",
                         address=f"10.0.{i // 250}.{i % 250}:7000", state=READY,
                         capacity={"block_size": BLOCK, "num_blocks": 4096}) for i, role in enumerate(roles)]


def random_stats(rng: random.Random) -> engine_pb2.StatsResponse:
    return engine_pb2.StatsResponse(num_running=rng.randint(0, 64), num_waiting=rng.randint(0, 8),
                                    num_awaiting_kv=rng.randint(0, 2), num_free_blocks=rng.randint(0, 4096),
                                    num_total_blocks=4096, waiting_prefill_tokens=rng.randint(0, 8000))


SYSTEM = random.Random(-1).choices(range(8192), k=SYSTEM_TOKENS)


def conversation(c: int, system: bool) -> list[int]:
    """The hashes of conversation c's 1500-token prompt."""
    rng = random.Random(c)
    ids = (SYSTEM if system else []) + rng.choices(range(8192), k=PROMPT_TOKENS - (SYSTEM_TOKENS if system else 0))
    return block_hashes(ids, BLOCK)


def setup(n: int, layout: str, scenario: str, rng: random.Random):
    """Records, clients with figures and KV events, and the prompts decisions draw from."""
    recs = records(n, layout)
    clients = LoadPlane()
    for r in recs:
        clients.observe(r.address, random_stats(rng))
    index = clients.kv_index
    if scenario == "affinity":
        held_by = n * 5 * 10 // 13   # conversations: 5 per engine, 1.3 engines each
        prompts = [conversation(c, True) for c in range(held_by + held_by // 4)]   # 20% never seen
        for r in recs:
            index.apply(r.address, prompts[0][:SYSTEM_TOKENS // BLOCK])
        for c in range(held_by):
            for r in rng.sample(recs, 2 if rng.random() < 0.3 else 1):
                index.apply(r.address, prompts[c][:rng.randint(40, len(prompts[c]))])
    else:
        prompts = [conversation(c, False) for c in range(500)]
        for r in recs:
            for c in rng.sample(range(len(prompts)), 6):
                index.apply(r.address, prompts[c][:rng.randint(10, len(prompts[c]))])
    held = sum(index.blocks(r.address) for r in recs) / n
    holders = sum(len(index.match(p)) for p in prompts[:500]) / min(len(prompts), 500)
    return recs, clients, prompts, held, holders


def _module_at(rev: str, path: str, name: str, source_edit=lambda s: s):
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:server/pdserve/{path}"],
                            check=True, capture_output=True, text=True).stdout
    file = os.path.join(tempfile.mkdtemp(), f"{name}.py")
    with open(file, "w") as f:
        f.write(source_edit(source))
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_router_at(rev: str):
    """REV's Router, and the class of the clients it takes: a router of before the load plane
    (cluster/load.py) takes REV's EngineClients, which kept the loads themselves."""
    has_plane = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{rev}:server/pdserve/cluster/load.py"],
                               capture_output=True).returncode == 0
    if has_plane:
        return _module_at(rev, "cluster/router.py", "router_baseline").Router, LoadPlane
    clients = _module_at(rev, "cluster/engine_client.py", "engine_client_baseline").EngineClients
    router = _module_at(rev, "cluster/router.py", "router_baseline", lambda s: s.replace(
        "from pdserve.cluster.engine_client import", "from engine_client_baseline import"))
    return router.Router, clients


def run(router_cls, policy: str, recs, clients, prompts, decisions: int, rng: random.Random, kv: bool,
        clients_cls=LoadPlane) -> list[int]:
    if clients_cls is LoadPlane:
        clients._listeners.clear()   # the routers of earlier runs stop listening
        observe = clients.observe
    else:   # an older router's own clients, with the same figures
        figures, clients = clients, clients_cls()
        for r in recs:
            clients.get(r.address).observe(figures.last_stats(r.address))
        observe = lambda address, stats: clients.get(address).observe(stats)   # noqa: E731
    router = router_cls(View(recs), clients, policy)
    addresses = [r.address for r in recs]
    answers = [random_stats(rng) for _ in range(256)]
    times = []
    new_api = router_cls is Router
    for k in range(decisions + 1000):
        hashes = [h + 1 - 1 for h in prompts[rng.randrange(len(prompts))]]   # fresh from the hashing, as in the server
        t0 = time.perf_counter_ns()
        if new_api:
            route = router.choose("m", "1", prompt_tokens=PROMPT_TOKENS, prompt_hashes=hashes if kv else ())
        else:
            route = router.choose("m", "1")
        scope = router.track(route)
        scope.__enter__()
        t1 = time.perf_counter_ns()
        scope.__exit__(None, None, None)
        if k >= 1000:
            times.append(t1 - t0)
        observe(addresses[k % len(addresses)], answers[k % len(answers)])   # a poll answers
    return times


def pct(times: list[int], q: float) -> float:
    times = sorted(times)
    return times[min(int(q * len(times)), len(times) - 1)] / 1000


def cpu_summary() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    has = [f for f in ("avx2", "avx512f") if f in flags]
    return f"{model}; {os.cpu_count()} cores; {', '.join(has) or 'no avx2'}; {'no avx512f' if 'avx512f' not in flags else ''}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", type=int, default=20000)
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--layouts", default="aggregated,pd")
    ap.add_argument("--baseline", default="", help="a git revision whose router is timed too")
    args = ap.parse_args()
    rng = random.Random(0)
    ids = random.Random(0).choices(range(8192), k=PROMPT_TOKENS)
    t = time.perf_counter_ns()
    for _ in range(100):
        block_hashes(ids, BLOCK)
    hash_us = (time.perf_counter_ns() - t) / 100 / 1000
    print(f"# CPU: {cpu_summary()}; Python {platform.python_version()}")
    tokenizer_json = os.path.join(ROOT, "model_repository", "tiny-qwen2", "1", "tokenizer.json")
    if os.path.exists(tokenizer_json):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tokenizer_json)
        text = tok.decode(random.Random(1).choices(range(300, 8000), k=PROMPT_TOKENS))
        spent = []
        for _ in range(50):
            t = time.perf_counter_ns()
            n_ids = len(tok.encode(text).ids)
            spent.append(time.perf_counter_ns() - t)
        print(f"# tokenizers encode of a {n_ids}-token prompt (demo model tiny-qwen2): {pct(spent, 0.5):.0f} us "
              "(in the tokenizer thread pool, not in the decision)")
    print(f"# block_hashes of a {PROMPT_TOKENS}-token prompt ({PROMPT_TOKENS // BLOCK} blocks): {hash_us:.0f} us "
          "(in the tokenizer thread pool, not in the decision)")
    print("| layout | engines | router | policy | scenario | p50 us | p99 us | hashes per engine | holders per prompt |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|")
    baseline = load_router_at(args.baseline) if args.baseline else None
    for layout in args.layouts.split(","):
        for n in map(int, args.sizes.split(",")):
            runs = [("this", (Router, LoadPlane), p, "affinity") for p in ("round_robin", "least_load", "kv_aware")]
            runs.append(("this", (Router, LoadPlane), "kv_aware", "scattered"))
            if baseline:
                runs += [(args.baseline, baseline, p, "affinity") for p in ("round_robin", "least_load")]
            built = {}
            for name, cls, policy, scenario in runs:
                if scenario not in built:
                    built = {scenario: setup(n, layout, scenario, rng)}
                recs, clients, prompts, held, holders = built[scenario]
                gc.collect()
                times = run(cls[0], policy, recs, clients, prompts, args.decisions, rng, policy == "kv_aware", cls[1])
                print(f"| {layout} | {n} | {name} | {policy} | {scenario if policy == 'kv_aware' else '-'} | "
                      f"{pct(times, 0.5):.1f} | {pct(times, 0.99):.1f} | {held:.0f} | {holders:.1f} |", flush=True)


if __name__ == "__main__":
    main()

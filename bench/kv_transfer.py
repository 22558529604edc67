"""KV handoff bandwidth: pdserve's layer-wise batched push against a raw Mooncake write, one run.

Two processes on this host, each with a KV pool shaped like the demo model's (layer-major,
float32: 8 layers x 2 x 16 tokens x 4 KV heads x 64 dims = 32 KiB per layer per block). The
sender moves a 1024-token prompt's KV (64 blocks, 16 MiB) into the receiver's pool:
  raw:       Mooncake batch_transfer_sync_write of the same bytes as one contiguous source and
             destination, in the chunking that is fastest here (tried: 256 KiB .. 16 MiB)
  pdserve:   MooncakeTransport.submit_layer for each layer (one async batch per layer, runs of
             consecutive blocks merged) and one wait, as a PREFILL engine does in a step;
             blocks as a fresh pool allocates them (consecutive), and scattered (every other block,
             the worst case after churn: nothing merges)
Prints MB/s (median of --repeat runs each) and pdserve/raw.

    python bench/kv_transfer.py [--tokens 1024 --repeat 20]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import time


LAYERS, BLOCK, KV_HEADS, DIM = 8, 16, 4, 64
POOL_BLOCKS = 512


def make_pool():
    import torch
    return torch.randn(LAYERS, POOL_BLOCKS, 2, BLOCK, KV_HEADS, DIM).transpose(0, 1)


def receiver(q, done):
    from pdserve.engine.kv_transport import MooncakeTransport
    transport = MooncakeTransport("127.0.0.1")
    pool = make_pool()
    transport.register_pool(pool)
    q.put(transport.handshake())
    done.wait()


def cpu_summary() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), []))
    return f"{model}, {os.cpu_count()} cores, " + " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                                                            if f in flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    os.environ.setdefault("GLOG_minloglevel", "2")
    from pdserve.engine.kv_transport import KVDestination, MooncakeTransport

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=receiver, args=(q, done), daemon=True)
    proc.start()
    handshake = q.get(timeout=120)
    sender = MooncakeTransport("127.0.0.1")
    pool = make_pool()
    sender.register_pool(pool)
    blocks = -(-args.tokens // BLOCK)
    nbytes = blocks * LAYERS * sender.block_bytes
    eng = sender.engine

    def raw(chunk: int) -> float:
        src, dst = sender.base, handshake["base_address"]
        offsets = list(range(0, nbytes, chunk))
        start = time.perf_counter()
        status = eng.batch_transfer_sync_write(handshake["session"], [src + o for o in offsets],
                                               [dst + o for o in offsets], [min(chunk, nbytes - o) for o in offsets])
        assert status == 0
        return nbytes / (time.perf_counter() - start) / 1e6

    def layered(src_blocks: list[int], dst_blocks: list[int]) -> float:
        dest = KVDestination(**handshake, block_ids=tuple(dst_blocks))
        start = time.perf_counter()
        handles = [sender.submit_layer(dest, layer, src_blocks, dst_blocks)[0] for layer in range(LAYERS)]
        sender.wait(handles)
        return nbytes / (time.perf_counter() - start) / 1e6

    raw(1 << 20)   # handshake and warm-up
    consecutive = list(range(blocks)), list(range(100, 100 + blocks))
    scattered = list(range(0, 2 * blocks, 2)), list(range(101, 101 + 2 * blocks, 2))
    results = {f"raw_{c >> 10}KiB": [] for c in (256 << 10, 1 << 20, 4 << 20, 16 << 20)}
    results.update(pdserve_consecutive=[], pdserve_scattered=[])
    for _ in range(args.repeat):      # interleaved, so drift on this VM touches every variant alike
        for chunk in (256 << 10, 1 << 20, 4 << 20, 16 << 20):
            results[f"raw_{chunk >> 10}KiB"].append(raw(chunk))
        results["pdserve_consecutive"].append(layered(*consecutive))
        results["pdserve_scattered"].append(layered(*scattered))
    done.set()
    proc.join(10)
    medians = {k: statistics.median(v) for k, v in results.items()}
    best_raw = max(v for k, v in medians.items() if k.startswith("raw"))
    print(f"CPU: {cpu_summary()}")
    print(f"{args.tokens}-token prompt: {nbytes / 2**20:.0f} MiB of KV, {LAYERS} layers, median of {args.repeat}")
    for key, value in medians.items():
        print(f"  {key:22s} {value:8.0f} MB/s   {value / best_raw:5.2f} of the best raw")
    print(json.dumps({"tokens": args.tokens, "bytes": nbytes, "MBps": medians,
                      "pdserve_over_best_raw": medians["pdserve_consecutive"] / best_raw}))


if __name__ == "__main__":
    main()

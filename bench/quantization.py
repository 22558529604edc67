"""int8 weights (`quantization: int8`) against bfloat16 at Qwen2.5-0.5B's shape, in one run: the
decode step (tok/s), the memory, and the greedy agreement.

  python bench/quantization.py [--batches 1 8 32] [--context 256] [--json bench/out/quantization.json]

- The model: tools/make_shape_model.py's qwen2.5-0.5b (random weights, bf16 checkpoint), written
  into bench/out/models on first use.
- Decode step: an engine per setting holding `batch` sequences of `context` tokens
  (rounds.DecodeSteps), bf16 and int8 measured in turn, round for round (this VM's speed drifts
  within minutes); the figure is the median of the rounds, tok/s = batch / step.
- Memory: each engine loaded alone in a child process: its resident memory once loaded, and the
  linears' weights as its load log reports them.
- Greedy agreement: 8 prompts x 64 greedy tokens, int8 against bf16: the share of positions with
  the same token, and the mean length of the common prefix.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys

from pdserve_testing.harness import ROOT
from rounds import DecodeSteps, make_prompts
from vs_vllm import cpu_info, describe_cpu

MODEL = os.path.join(ROOT, "bench", "out", "models", "qwen2.5-0.5b")
SETTINGS = {"bfloat16": {}, "int8": {"quantization": "int8"}}


def ensure_model() -> str:
    if not os.path.exists(os.path.join(MODEL, "config.json")):
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        from make_shape_model import SHAPES, write_model
        import pathlib
        write_model(pathlib.Path(MODEL), SHAPES["qwen2.5-0.5b"])
    return MODEL


def memory(options: dict) -> dict:
    """One engine loaded alone in a child process (this script with --child)."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(options)], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(__file__))
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(options: dict) -> None:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("pdserve").addHandler(handler)
    logging.getLogger("pdserve").setLevel(logging.INFO)
    LLMEngine(EngineConfig(model_path=MODEL, dtype="bfloat16", kv_cache_blocks=64, max_model_len=512, **options))
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    found = next((re.search(r"their weights ([\d.]+) MiB \(in the model's dtype ([\d.]+) MiB", s) for s in lines
                  if s.startswith("quantization: ") and "linears" in s), None)
    print(json.dumps({"rss_mib": round(rss), "linears_mib": float(found.group(1)) if found else None,
                      "linears_bf16_mib": float(found.group(2)) if found else None}))


def greedy(options: dict, prompts: list[list[int]], n: int) -> list[list[int]]:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve_testing.engines import greedy_tokens

    engine = LLMEngine(EngineConfig(model_path=MODEL, dtype="bfloat16", kv_cache_blocks=256, max_model_len=512,
                                    **options))
    return greedy_tokens(engine, prompts, n)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    total = sum(len(s) for s in a)
    prefixes = [next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), len(sa)) for sa, sb in zip(a, b)]
    return {"same_tokens": round(same / total, 3), "common_prefix_mean": round(statistics.mean(prefixes), 1),
            "tokens_per_sequence": len(a[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "quantization.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    ensure_model()
    info = cpu_info()
    print(f"cpu: {describe_cpu(info)}", flush=True)
    report = {"cpu": info, "model": "qwen2.5-0.5b shape, random weights", "context": args.context,
              "memory": {name: memory(options) for name, options in SETTINGS.items()}, "decode": {}}
    print(json.dumps(report["memory"]), flush=True)
    for batch in args.batches:
        steps = {name: DecodeSteps(MODEL, "bfloat16", "cpu", args.context, batch, args.rounds * args.steps + 4, **options)
                 for name, options in SETTINGS.items()}
        times = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, s in steps.items():
                times[name].append(s.measure(args.steps))
        ms = {name: statistics.median(t) for name, t in times.items()}
        report["decode"][batch] = {name: {"step_ms": round(v, 2), "tok_s": round(1000 * batch / v, 1)} for name, v in ms.items()}
        report["decode"][batch]["int8_speedup"] = round(ms["bfloat16"] / ms["int8"], 3)
        print(f"batch {batch}: {json.dumps(report['decode'][batch])}", flush=True)
        del steps
    from transformers import AutoTokenizer
    prompts = make_prompts(AutoTokenizer.from_pretrained(MODEL), 8, 64, seed=2)
    report["greedy_agreement"] = agreement(greedy({}, prompts, 64), greedy(SETTINGS["int8"], prompts, 64))
    print(f"greedy agreement int8 vs bf16: {json.dumps(report['greedy_agreement'])}", flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

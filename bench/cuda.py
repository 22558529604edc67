"""The engine and the server on a CUDA GPU, in one run (the GPU host has no vLLM: the peer here
is transformers' own continuous batching, generate_batch, on the same GPU).

Per dtype (float32, bfloat16), on the demo model and on a random model of Qwen2-0.5B's shape:
  - the reference workload (32 x 256 prompt x 128 greedy tokens): the engine in-process and
    the server (tritonclient streaming), round for round (bench_engine_and_server), and
    transformers' generate_batch;
  - the decode step at 32 x 1024 context against 32 x 256 (the long-context ratio);
  - the engine at larger batches (128, 256 requests), where a GPU starts to be used.

    python bench/cuda.py [--device cuda:0] [--out bench/out/cuda.json]

Writes the figures as JSON and a markdown table beside it (--out with .md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from measurements import bench_engine_and_server, bench_hf, long_context_ratio
from pdserve_testing.harness import ROOT
from rounds import EngineRounds, make_prompts, median_round

# Qwen2-0.5B's shape (vocabulary aside): a model whose linears are big enough for a GPU to show
QWEN2_05B = ["--hidden", "896", "--intermediate", "4864", "--layers", "24", "--heads", "14", "--kv-heads", "2"]


def make_model(out: str, shape: list[str]) -> str:
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_model.py"), out, *shape,
                        "--corpus-bytes", "1000000"], check=True)
    return out


def larger_batches(model: str, dtype: str, device: str, tokenizer, output_len: int, sizes: list[int]) -> list[dict]:
    engine = EngineRounds(model, dtype, device, output_len)
    out = []
    for n in sizes:
        prompts = make_prompts(tokenizer, n, 256, seed=2)
        rounds = [engine.round(prompts) for _ in range(3)]
        for r in rounds:
            r.pop("token_ids")
        out.append({"requests": n, **median_round(rounds)})
    del engine
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--pair-rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "cuda.json"))
    ap.add_argument("--models", default="demo,qwen2-0.5b-shape")
    ap.add_argument("--larger-batches", default="128,256", help="engine-only batch sizes beyond 32 ('' for none)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    work = tempfile.mkdtemp(prefix="pdserve-cuda-")
    models = {"demo": os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"),
              "qwen2-0.5b-shape": os.path.join(work, "qwen2-0.5b-shape")}
    gpu = args.device.startswith("cuda")
    report = {"device": torch.cuda.get_device_name(args.device) if gpu else args.device, "torch": torch.__version__,
              "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    print(json.dumps(report), flush=True)
    for name in args.models.split(","):
        path = models[name] if name == "demo" else make_model(models[name], QWEN2_05B)
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompts = make_prompts(tokenizer, 32, 256)
        texts = [tokenizer.decode(p) for p in prompts]
        for dtype in ("float32", "bfloat16"):
            run: dict = {"model": name, "dtype": dtype}
            pair = bench_engine_and_server(path, dtype, args.device, prompts, texts, args.output_len,
                                           rounds=args.pair_rounds)
            pair.pop("token_ids")
            run["engine_tok_s"] = pair["engine"]["output_tokens_per_s"]
            run["engine_decode_step_ms"] = pair["engine"]["decode_step_ms"]
            run["server_tok_s"] = pair["server"]["output_tokens_per_s"]
            run["server_over_engine"] = pair["server_over_engine"]
            run["server_ttft_s_median"] = pair["server"]["ttft_s_median"]
            run["server_tpot_ms_median"] = pair["server"]["tpot_ms_median"]
            hf = bench_hf(path, dtype, prompts, args.output_len, args.device)
            run["transformers_generate_batch_tok_s"] = hf["generate_batch"]["output_tokens_per_s"]
            run["engine_over_generate_batch"] = run["engine_tok_s"] / run["transformers_generate_batch_tok_s"]
            long = long_context_ratio(path, dtype, args.device)
            run["decode_step_ms_32x256"], run["decode_step_ms_32x1024"] = long["256"], long["1024"]
            run["long_context_ratio"] = long["ratio"]
            sizes = [int(n) for n in args.larger_batches.split(",") if n]
            run["larger_batches"] = larger_batches(path, dtype, args.device, tokenizer, args.output_len, sizes)
            torch.cuda.empty_cache()
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    write_table(report, os.path.splitext(args.out)[0] + ".md")


def write_table(report: dict, path: str) -> None:
    lines = [f"{report['device']}, torch {report['torch']} (CUDA {report['cuda']}), {report['date']}", "",
             "| model | dtype | engine tok/s | server tok/s | server / engine | transformers generate_batch tok/s "
             "| engine / generate_batch | decode step 32x256 ms | 32x1024 ms | ratio | engine tok/s at 128 / 256 reqs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        big = " / ".join(f"{b['output_tokens_per_s']:.0f}" for b in r["larger_batches"])
        lines.append(f"| {r['model']} | {r['dtype']} | {r['engine_tok_s']:.0f} | {r['server_tok_s']:.0f} | "
                     f"{r['server_over_engine']['median']:.2f} | {r['transformers_generate_batch_tok_s']:.0f} | "
                     f"{r['engine_over_generate_batch']:.2f}x | {r['decode_step_ms_32x256']:.1f} | "
                     f"{r['decode_step_ms_32x1024']:.1f} | {r['long_context_ratio']:.2f} | {big} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

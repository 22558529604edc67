"""Engine throughput on the reference workload (32 x 256 prompt x 128 greedy tokens), against
transformers, in one run.

Workload: 32 requests x 256 prompt tokens x 128 greedy output tokens (ignore_eos), offline.
Measured in this one process, one after the other, on the same machine:
  - pdserve's engine in-process (LLMEngine), and a sweep of batch sizes;
  - pdserve through the server (a pdserve process, tritonclient streaming, all requests at once),
    with each request's TPOT seen by the client against the engine's own decode step time;
  - transformers' generate_batch (continuous batching), and a raw transformers forward loop
    at the same batch size (prefill, then one forward per decode step with its KV cache).

    python bench/engine_throughput.py [--dtype float32] [--device cpu] [--json bench/out/engine.json]

The rounds live in bench/rounds.py and the measurements built from them in bench/measurements.py,
which bench/vs_vllm.py, bench/cuda.py and bench/server_vs_engine.py share.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from measurements import bench_engine, bench_hf, bench_server
from pdserve_testing.harness import ROOT
from rounds import make_prompts


def plot(report: dict, path: str) -> None:
    """Throughput and decode step time over batch size, and the systems side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    if "engine" in report:
        sweep = report["engine"]["sweep"]
        sizes = [r["requests"] for r in sweep]
        axes[0].plot(sizes, [r["output_tokens_per_s"] for r in sweep], "o-", label="output tok/s")
        ax2 = axes[0].twinx()
        ax2.plot(sizes, [r["decode_step_ms"] for r in sweep], "s--", color="tab:red", label="decode step (ms)")
        ax2.set_ylabel("decode step (ms)")
        axes[0].set(title="pdserve engine over batch size", xlabel="concurrent requests", ylabel="output tok/s")
        axes[0].legend(loc="upper left")
        ax2.legend(loc="lower right")
    bars = {}
    if "transformers" in report:
        bars["generate_batch"] = report["transformers"]["generate_batch"]["output_tokens_per_s"]
        bars["raw forward"] = report["transformers"]["raw_forward"]["output_tokens_per_s"]
    if "engine" in report:
        bars["pdserve engine"] = report["engine"]["workload"]["output_tokens_per_s"]
    if "server" in report:
        bars["pdserve server"] = report["server"]["output_tokens_per_s"]
    axes[1].bar(list(bars), list(bars.values()), color="tab:blue")
    axes[1].set(title=f"32 x 256 prompt x 128 output, {report['dtype']}", ylabel="output tok/s")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip", action="append", default=[], choices=["engine", "server", "hf"])
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "engine_throughput.json"))
    args = ap.parse_args()

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = make_prompts(tokenizer, args.num_requests, args.prompt_len)
    texts = [tokenizer.decode(p) for p in prompts]
    report: dict = {"torch_threads": torch.get_num_threads(), "dtype": args.dtype, "device": args.device,
                    "cpu": os.uname().machine, "cores": os.cpu_count(), "args": vars(args)}
    if "hf" not in args.skip:
        report["transformers"] = bench_hf(args.model, args.dtype, prompts, args.output_len, args.device)
        print(json.dumps(report["transformers"], indent=1), flush=True)
    if "engine" not in args.skip:
        report["engine"] = bench_engine(args.model, args.dtype, args.device, prompts, args.output_len)
        print(json.dumps(report["engine"], indent=1), flush=True)
    if "server" not in args.skip:
        report["server"] = bench_server(args.model, args.dtype, args.device, texts, args.output_len)
        print(json.dumps(report["server"], indent=1), flush=True)
    if "engine" in report and "server" in report:
        step = report["engine"]["workload"]["decode_step_ms"]
        report["server_tpot_over_engine_step"] = report["server"]["tpot_ms_median"] / step
    if "engine" in report and "transformers" in report:
        report["engine_over_generate_batch"] = (report["engine"]["workload"]["output_tokens_per_s"]
                                                / report["transformers"]["generate_batch"]["output_tokens_per_s"])
    if "server" in report and "transformers" in report:
        report["server_over_generate_batch"] = (report["server"]["output_tokens_per_s"]
                                                / report["transformers"]["generate_batch"]["output_tokens_per_s"])
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.splitext(args.json)[0] + ".png")
    for key in ("engine_over_generate_batch", "server_over_generate_batch", "server_tpot_over_engine_step"):
        if key in report:
            print(f"{key}: {report[key]:.2f}")


if __name__ == "__main__":
    main()

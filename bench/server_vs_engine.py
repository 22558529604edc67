"""Server against engine, round for round: pdserve's engine in this process and a pdserve server
(one BOTH engine, tritonclient streaming) take turns on the reference workload (32 x 256 prompt
tokens x 128 greedy tokens, float32), an engine round first and last, so the shared VM's drift
hits both alike; each server round is set against the mean of the engine rounds on either side
of it, and the ratio is the median of those (bench/measurements.py: bench_engine_and_server).

The in-process engine runs with OMP_WAIT_POLICY=PASSIVE, as pdserve starts its engines
(repository/engine_process.py: engine_environment), unless the environment sets a policy. Both run
with prefix caching off, so every round does its 32 prefills (rounds.PREFIX_CACHING).

    python bench/server_vs_engine.py [--rounds 7] [--dtype float32] [--client tritonclient|perf_analyzer]
                                     [--frontend-cpu-priority auto|batch|idle|normal]
"""
import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # read once, when torch loads OpenMP

from measurements import bench_engine_and_server  # noqa: E402
from pdserve_testing.harness import ROOT  # noqa: E402
from rounds import make_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--stream-interval", type=int, default=1, help="the model's stream_interval (1: a response per token)")
    ap.add_argument("--client", choices=["tritonclient", "perf_analyzer"], default="tritonclient",
                    help="the streaming client that measures the server (perf_analyzer: Triton's C++ load generator)")
    ap.add_argument("--frontend-cpu-priority", choices=["auto", "batch", "idle", "normal"], default="auto",
                    help="the server's --frontend-cpu-priority (auto, its default: idle beside this one engine "
                         "on every core)")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    model = os.path.join(ROOT, "model_repository", "tiny-qwen2", "1")
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.encode(tokenizer.decode(p)) for p in make_prompts(tokenizer, 32, 256)]
    texts = [tokenizer.decode(p) for p in prompts]
    r = bench_engine_and_server(model, args.dtype, "cpu", prompts, texts, 128, args.rounds, args.stream_interval,
                                args.client, ("--frontend-cpu-priority", args.frontend_cpu_priority))
    summary = {"dtype": args.dtype, "client": args.client, "stream_interval": args.stream_interval,
               "frontend_cpu_priority": args.frontend_cpu_priority, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
               "engine_tok_s": [round(x["output_tokens_per_s"]) for x in r["engine"]["rounds"]],
               "server_tok_s": [round(x["output_tokens_per_s"]) for x in r["server"]["rounds"]],
               "server_tokens_per_response": [round(x["tokens_per_response"], 2) for x in r["server"]["rounds"]],
               "server_tpot_ms": [round(x["tpot_ms_median"], 1) for x in r["server"]["rounds"]],
               "engine_decode_step_ms": [round(x["decode_step_ms"], 1) for x in r["engine"]["rounds"]],
               "server_over_engine_pairs": r["server_over_engine"]["pairs"],
               "server_over_engine_median": round(r["server_over_engine"]["median"], 3)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

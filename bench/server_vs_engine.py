"""Server against engine in one run: the engine in-process, then the server with its engines at
pdserve's default (OMP_WAIT_POLICY=PASSIVE, repository/supervisor.py) and with OpenMP's spinning
policy (OMP_WAIT_POLICY=ACTIVE) for comparison (float32, the reference workload).

    python bench/server_vs_engine.py
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "bench"), os.path.join(ROOT, "tests")]

from engine_throughput import bench_engine, bench_server, make_prompts  # noqa: E402


def main() -> None:
    from transformers import AutoTokenizer
    model = os.path.join(ROOT, "model_repository", "tiny-qwen2", "1")
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = make_prompts(tokenizer, 32, 256)
    texts = [tokenizer.decode(p) for p in prompts]
    engine = bench_engine(model, "float32", "cpu", prompts, 128, sweep=False)["workload"]
    print("engine", json.dumps({k: engine[k] for k in ("output_tokens_per_s", "decode_step_ms")}), flush=True)
    for policy in ("", "ACTIVE"):
        if policy:
            os.environ["OMP_WAIT_POLICY"] = policy   # inherited by the server and its engines
        server = bench_server(model, "float32", "cpu", texts, 128)
        ratio = server["output_tokens_per_s"] / engine["output_tokens_per_s"]
        print(f"server (OMP_WAIT_POLICY={policy or 'pdserve default: PASSIVE'})",
              json.dumps({k: server[k] for k in ("output_tokens_per_s", "tpot_ms_median")}),
              f"server/engine {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Prints the AIPerf runs under bench/aiperf/ side by side as a markdown table.

    python bench/aiperf_summary.py [bench/aiperf]

Output tokens/s is counted from the servers' own `usage` (completion tokens), not from AIPerf's
re-tokenization of the text: a byte-level BPE tokenizer splits a random model's output into
fewer or more tokens than were generated.
"""
import json
import os
import sys

ROWS = [
    ("requests (errors)", lambda d: f"{int(d['request_count']['avg'])} ({len(d.get('error_summary') or [])})"),
    ("duration (s)", lambda d: f"{d['benchmark_duration']['avg']:.1f}"),
    ("output tok/s (server usage)", lambda d: f"{d['usage_completion_tokens']['sum'] / d['benchmark_duration']['avg']:.1f}"),
    ("requests/s", lambda d: f"{d['request_throughput']['avg']:.2f}"),
    ("TTFT p50 / p99 (ms)", lambda d: f"{d['time_to_first_token']['p50']:.0f} / {d['time_to_first_token']['p99']:.0f}"),
    ("inter-token latency p50 / p99 (ms)", lambda d: f"{d['inter_token_latency']['p50']:.1f} / {d['inter_token_latency']['p99']:.1f}"),
    ("request latency p50 / p99 (ms)", lambda d: f"{d['request_latency']['p50']:.0f} / {d['request_latency']['p99']:.0f}"),
    ("prompt / completion tokens per request (usage)",
     lambda d: f"{d['usage_prompt_tokens']['avg']:.0f} / {d['usage_completion_tokens']['avg']:.0f}"),
]


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "aiperf")
    runs = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "profile_export_aiperf.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[name] = json.load(f)
    print("| metric | " + " | ".join(runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for label, fn in ROWS:
        print(f"| {label} | " + " | ".join(fn(d) for d in runs.values()) + " |")


if __name__ == "__main__":
    main()

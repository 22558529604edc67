"""The server measured by Triton's own load generator: perf_analyzer (C++, from the
tritonclient 2.51.0 wheel, the one genai-perf 0.0.16 drives), streaming over ModelStreamInfer.

Why a second client: tritonclient's Python stream client spends CPU on every streamed response
in the Python callback and its parsing, and on a small host that CPU is taken from the engine.
perf_analyzer is what Triton users benchmark with, and costs less per response (bench/RESULTS.md
has both clients' CPU per round). Both clients measure the same round: every prompt
sent at once (concurrency = number of prompts, one request each), timed from the first request
sent to the last response received (perf_analyzer's profile export holds the timestamps and
every response's outputs).

perf_analyzer is installed on demand into its own virtualenv (tritonclient[all]==2.51.0 and
nvidia-cuda-runtime-cu12, whose libcudart the binary links), .venv-perf-analyzer/ unless
PERF_ANALYZER_VENV names another; it also needs Debian's libb64-0d (apt-get install libb64-0d).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from rounds import ServerRounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERF_ANALYZER_VENV = os.environ.get("PERF_ANALYZER_VENV", os.path.join(ROOT, ".venv-perf-analyzer"))


def ensure_perf_analyzer(venv: str = PERF_ANALYZER_VENV) -> tuple[str, dict]:
    """The perf_analyzer binary and the environment it runs in; installs them if missing."""
    binary = os.path.join(venv, "bin", "perf_analyzer")
    if not os.path.exists(binary):
        print(f"installing perf_analyzer (tritonclient 2.51.0) into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "tritonclient[all]==2.51.0",
                        "nvidia-cuda-runtime-cu12"], check=True)
    libs = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "nvidia", "cuda_runtime", "lib"))
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(libs + [os.environ.get("LD_LIBRARY_PATH", "")])}
    probe = subprocess.run([binary, "--version"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        hint = " (apt-get install libb64-0d)" if "libb64" in probe.stderr else ""
        raise RuntimeError(f"perf_analyzer does not run{hint}: {probe.stderr.strip()[:300]}")
    return binary, env


class PerfAnalyzerRounds(ServerRounds):
    """A pdserve server (one BOTH engine) driven by perf_analyzer; round() sends every prompt at
    once over ModelStreamInfer (concurrency = len(texts), one request each)."""

    def __init__(self, model: str, dtype: str, device: str, output_len: int, stream_interval: int = 1,
                 server_args: tuple[str, ...] = ()):
        self.binary, self.env = ensure_perf_analyzer()
        self.workdir = tempfile.mkdtemp(prefix="pdserve-pa-")
        super().__init__(model, dtype, device, output_len, stream_interval, server_args)

    def round(self, texts: list[str]) -> dict:
        data = os.path.join(self.workdir, "input.json")
        export = os.path.join(self.workdir, "profile.json")
        with open(data, "w") as f:
            json.dump({"data": [{"text_input": [t], "stream": [True], "return_num_output_tokens": [True],
                                 "sampling_parameters": [json.dumps(self.params)]} for t in texts]}, f)
        if os.path.exists(export):   # perf_analyzer refuses to overwrite one
            os.remove(export)
        n = len(texts)
        run = subprocess.run([self.binary, "-m", "bench", "-i", "grpc", "-u", self.server.url, "--streaming",
                              "--concurrency-range", str(n), "--request-count", str(n), "--input-data", data,
                              "--profile-export-file", export, "--measurement-interval", "600000"],
                             env=self.env, capture_output=True, text=True, timeout=900)
        if run.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed ({run.returncode}): {run.stderr[:1500] or run.stdout[-1500:]}")
        with open(export) as f:
            requests = [r for e in json.load(f)["experiments"] for r in e["requests"]]
        if len(requests) < n:
            raise RuntimeError(f"perf_analyzer exported {len(requests)} requests of {n}")
        requests = sorted(requests, key=lambda r: r["timestamp"])[-n:]
        start = min(r["timestamp"] for r in requests)
        end, tokens, ttfts, tpots, responses = start, 0, [], [], 0
        for r in requests:
            # perf_analyzer asks for Triton's empty final response (triton_enable_empty_final_response),
            # and its export shows uninitialised values for that response's absent outputs: read
            # the responses up to the one that carries the finish reason
            outputs = r["response_outputs"]
            last = next(i for i, o in enumerate(outputs) if o.get("finish_reason"))
            counts = [int(o["num_output_tokens"]) for o in outputs[:last + 1]]
            stamps = r["response_timestamps"][:last + 1]
            tokens += sum(counts)
            responses += len(stamps)
            end = max(end, stamps[-1])
            ttfts.append((stamps[0] - r["timestamp"]) / 1e9)
            if sum(counts) > 1:
                tpots.append((stamps[-1] - stamps[0]) / 1e9 / (sum(counts) - 1))
        wall = (end - start) / 1e9
        if tokens != n * self.params["max_tokens"]:
            raise RuntimeError(f"perf_analyzer round got {tokens} tokens, expected {n * self.params['max_tokens']}")
        return {"seconds": wall, "output_tokens_per_s": tokens / wall, "tokens_per_response": tokens / responses,
                "ttft_s_median": statistics.median(ttfts), "tpot_ms_median": 1000 * statistics.median(tpots),
                "client": "perf_analyzer"}

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.workdir, ignore_errors=True)

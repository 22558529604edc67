#!/usr/bin/env bash
# The AIPerf comparison of bench/RESULTS.md in one run: pdserve (PD demo config), pdserve (one
# BOTH engine), vLLM-CPU, one after the other on the same model copy and the same prompts.
#   PYTHON=... AIPERF=... VLLM_PYTHON=... bash bench/aiperf_compare.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
bash "$HERE/aiperf_openai.sh" prepare
for target in pdserve pdserve-both vllm; do
  echo "=== $target $(date -u +%H:%M:%S)"
  bash "$HERE/aiperf_openai.sh" "$target" > /dev/null
done
python3 "$HERE/aiperf_summary.py"

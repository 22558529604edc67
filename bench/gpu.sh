#!/usr/bin/env bash
# vLLM and pdserve on one GPU, the same Qwen2.5-0.5B-shaped model (random weights, the demo
# tokenizer: tools/make_shape_model.py) and the same prompt token ids, bfloat16:
# bench/vs_vllm.py with --device cuda:0 (32 x 256 prompt x 128 greedy tokens; vLLM and pdserve's
# engine round for round, then the engine and the server; the long-context ratio).
#
#   bash bench/gpu.sh                 # a GPU machine that reaches PyPI
#   WHEELS=/dir bash bench/gpu.sh     # offline: pdserve's missing dependencies and vLLM's, as wheels in /dir
#
# Installs what it needs: pdserve (its dependencies, its protos) into the python that holds a CUDA
# torch (PYTHON, default python3), and vLLM into its own virtualenv (VLLM_VENV, default
# /tmp/vllm-gpu: vLLM pins its own torch). vLLM's own CUDA-graph and attention settings are its
# defaults (FlashAttention / FlashInfer as it picks them); pdserve's engine captures its decode
# CUDA graphs at load and decodes through FlashInfer where flashinfer-python installs (docs/engine.md). The measurement is bounded by BENCH_TIMEOUT
# seconds (default 420: installs aside, the whole run fits in 8 minutes). Writes bench/out/gpu.json,
# bench/gpu.md (the table for bench/RESULTS.md) and bench/gpu.png.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-/tmp/vllm-gpu}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-420}
PIP_SOURCE=()
if [ -n "${WHEELS:-}" ]; then
  PIP_SOURCE=(--no-index --find-links "$WHEELS")
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch; assert torch.cuda.is_available(), "this python has no CUDA torch"; print("torch", torch.__version__, torch.cuda.get_device_name(0))'

start=$(date +%s)
# pdserve: its dependencies (torch stays as it is), its generated protos, the package itself
# (setup.py also builds the CPU kernels: the GPU engine does not use them, g++ is needed all the same)
"$PY" -m pip install -q "${PIP_SOURCE[@]}" "grpcio-tools>=1.80,<1.81" "protobuf>=6.31,<7" matplotlib
"$PY" "$ROOT/protos/generate.py"
"$PY" -m pip install -q "${PIP_SOURCE[@]}" --no-build-isolation -e "$ROOT"
# FlashInfer's paged decode for pdserve's engine (kernels/flashinfer_decode.py): without it the
# engine logs so and decodes through SDPA over gathered blocks; the engine log says which ran
"$PY" -m pip install -q "${PIP_SOURCE[@]}" flashinfer-python || echo "flashinfer-python not installed: pdserve decodes through SDPA"
# vLLM in its own virtualenv
if ! "$VENV/bin/python" -c 'import vllm' 2>/dev/null; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "${PIP_SOURCE[@]}" vllm
fi
"$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
echo "installs took $(( $(date +%s) - start )) s"

cd "$ROOT"
# the demo tokenizer the shaped model borrows
[ -f model_repository/tiny-qwen2/1/model.safetensors ] || "$PY" tools/make_demo_model.py model_repository/tiny-qwen2/1
timeout "$BENCH_TIMEOUT" "$PY" bench/vs_vllm.py --device cuda:0 --model-shape qwen2.5-0.5b --dtypes bfloat16 \
  --vllm-venv "$VENV" --skip vllm-default --stream-intervals 1 --vllm-pairs 3 --pair-rounds 3 \
  --json bench/out/gpu.json --table bench/gpu.md --png bench/gpu.png

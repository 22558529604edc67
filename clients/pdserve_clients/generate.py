"""pdserve-generate: stream a completion from a pdserve (or Triton vLLM-backend) server.

    pdserve-generate "def fibonacci(n):" --max-tokens 64
"""
from __future__ import annotations

import argparse
import sys

from pdserve_clients.client import InferenceServerException, LLMClient


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("--url", default="localhost:8001")
    ap.add_argument("--model", default="tiny-qwen2")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--no-stream", action="store_true", help="one ModelInfer call instead of a stream")
    ap.add_argument("--stats", action="store_true", help="print token counts and latencies to stderr")
    args = ap.parse_args(argv)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k}
    if args.seed is not None:
        sampling["seed"] = args.seed
    if args.stop:
        sampling["stop"] = args.stop
    client = LLMClient(args.url, args.model)
    try:
        if args.no_stream:
            result = client.generate(args.prompt, **sampling)
            sys.stdout.write(result.text)
        else:
            for piece in client.stream(args.prompt, **sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
            result = client.result
        sys.stdout.write("\n")
    except InferenceServerException as exc:
        print(f"error: {exc.status()}: {exc.message()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.stats:
        print(f"[{result.num_input_tokens} prompt tokens, {result.num_output_tokens} generated, "
              f"finish={result.finish_reason}, ttft={result.ttft_s * 1000:.1f} ms, "
              f"tpot={result.tpot_s * 1000:.1f} ms]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

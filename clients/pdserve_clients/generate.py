"""pdserve-generate: stream a completion from a pdserve (or Triton vLLM-backend) server.

    pdserve-generate "def fibonacci(n):" --max-tokens 64            # KServe v2 gRPC (:8001)
    pdserve-generate "def fibonacci(n):" --http                     # KServe v2 HTTP generate_stream (:8000)
    pdserve-generate "def fibonacci(n):" --openai                   # OpenAI /v1/completions (:9000)

Errors print as `error: STATUS: message` (the gRPC status or the HTTP status) and exit 1.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from typing import Iterator
from urllib.parse import quote

from pdserve_clients.client import GenerationResult, InferenceServerException, LLMClient

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000", "openai": "localhost:9000"}


class DoorError(Exception):
    def __init__(self, status, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _split(url: str) -> tuple[str, int]:
    url = url.split("://", 1)[-1].rstrip("/")
    host, _, port = url.rpartition(":")
    return (host or "localhost"), int(port)


def _sse(url: str, path: str, body: dict, error_of) -> Iterator[dict]:
    """POSTs body and yields the JSON of each server-sent event; raises DoorError on failure."""
    host, port = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", "Accept": "text/event-stream"})
        response = conn.getresponse()
        if response.status != 200:
            raw = response.read().decode(errors="replace")
            try:
                message = error_of(json.loads(raw))
            except (ValueError, KeyError, TypeError):
                message = raw or response.reason
            raise DoorError(response.status, message)
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise DoorError("stream", error_of(event))
            yield event
    except OSError as exc:
        raise DoorError("unreachable", f"cannot reach {url} ({exc})") from exc
    finally:
        conn.close()


def stream_http(url: str, model: str, prompt: str, sampling: dict, result: GenerationResult) -> Iterator[str]:
    """Triton's generate extension: POST /v2/models/{model}/generate_stream."""
    body = {"text_input": prompt, "exclude_input_in_output": True, "return_finish_reason": True,
            "return_num_input_tokens": True, "return_num_output_tokens": True, "parameters": sampling}
    start = time.monotonic()
    for event in _sse(url, f"/v2/models/{quote(model)}/generate_stream", body, lambda e: e["error"]):
        piece = event.get("text_output", "")
        result.num_output_tokens += int(event.get("num_output_tokens", 0))
        result.num_input_tokens = int(event.get("num_input_tokens", result.num_input_tokens))
        result.finish_reason = event.get("finish_reason", result.finish_reason)
        if piece:
            yield _take(result, piece, start)
    result.latency_s = time.monotonic() - start


def _take(result: GenerationResult, piece: str, start: float) -> str:
    """Adds a streamed piece to the result (the first one sets the time to first token)."""
    if not result.text:
        result.ttft_s = time.monotonic() - start
    result.text += piece
    return piece


def stream_openai(url: str, model: str, prompt: str, sampling: dict, result: GenerationResult) -> Iterator[str]:
    """The OpenAI-compatible API: POST /v1/completions with stream and usage."""
    body = {"model": model, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **sampling}
    start = time.monotonic()
    for event in _sse(url, "/v1/completions", body, lambda e: e["error"]["message"]):
        if event.get("usage"):
            result.num_input_tokens = event["usage"]["prompt_tokens"]
            result.num_output_tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices", []):
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
            piece = choice.get("text", "")
            if piece:
                yield _take(result, piece, start)
    result.latency_s = time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", help="the prompt text")
    door = ap.add_mutually_exclusive_group()
    door.add_argument("--http", action="store_true", help="use the KServe v2 HTTP/REST door (generate_stream)")
    door.add_argument("--openai", action="store_true", help="use the OpenAI-compatible API (/v1/completions)")
    ap.add_argument("--url", help="host:port of the server (default: localhost:8001 gRPC, :8000 with --http, "
                                  ":9000 with --openai)")
    ap.add_argument("--model", default="tiny-qwen2", help="the model's name (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64, metavar="N", help="most tokens to generate (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0, metavar="T",
                    help="sampling temperature; 0 is greedy (default: %(default)s)")
    ap.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass, 1 turns it off (default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens, 0 turns it off (default: %(default)s)")
    ap.add_argument("--seed", type=int, help="seed for sampling: the same seed gives the same text")
    ap.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    ap.add_argument("--no-stream", action="store_true", help="gRPC: one ModelInfer call instead of a stream")
    ap.add_argument("--stats", action="store_true", help="print token counts and latencies to stderr")
    args = ap.parse_args(argv)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k}
    if args.seed is not None:
        sampling["seed"] = args.seed
    if args.stop:
        sampling["stop"] = args.stop
    if args.ignore_eos:
        sampling["ignore_eos"] = True
    protocol = "http" if args.http else "openai" if args.openai else "grpc"
    url = args.url or DEFAULT_URLS[protocol]
    try:
        if protocol == "grpc":
            result = _grpc(url, args, sampling)
        else:
            result = GenerationResult()
            stream = stream_http if protocol == "http" else stream_openai
            for piece in stream(url, args.model, args.prompt, sampling, result):
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
    except InferenceServerException as exc:
        status = (exc.status() or "").replace("StatusCode.", "") or "error"
        print(f"error: {status}: {exc.message()}", file=sys.stderr)
        return 1
    except DoorError as exc:
        print(f"error: {exc.status}: {exc.message}", file=sys.stderr)
        return 1
    if args.stats:
        print(f"[{result.num_input_tokens} prompt tokens, {result.num_output_tokens} generated, "
              f"finish={result.finish_reason}, ttft={result.ttft_s * 1000:.1f} ms, "
              f"tpot={result.tpot_s * 1000:.1f} ms]", file=sys.stderr)
    return 0


def _grpc(url: str, args, sampling: dict) -> GenerationResult:
    client = LLMClient(url, args.model)
    # Ask the server to end the stream with the error's status (Triton's triton_grpc_error header),
    # so an error prints its status rather than "None".
    start_stream = client.client.start_stream
    client.client.start_stream = lambda callback, **kw: start_stream(
        callback=callback, headers={"triton_grpc_error": "true"}, **kw)
    try:
        if args.no_stream:
            result = client.generate(args.prompt, **sampling)
            sys.stdout.write(result.text)
            return result
        for piece in client.stream(args.prompt, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        return client.result
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())

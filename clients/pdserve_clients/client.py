"""A small generation client over tritonclient.grpc: any Triton vLLM-backend server works too."""
from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


@dataclass
class GenerationResult:
    text: str = ""
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    ttft_s: float = 0.0                      # time to the first token
    piece_times: list[float] = field(default_factory=list)  # seconds since the request, per response with tokens
    latency_s: float = 0.0

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        if self.num_output_tokens < 2:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.num_output_tokens - 1)


def build_inputs(prompt: str, stream: bool, sampling: dict) -> list[grpcclient.InferInput]:
    tensors = []

    def add(name: str, datatype: str, value) -> None:
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=object if datatype == "BYTES" else bool))
        tensors.append(tensor)

    add("text_input", "BYTES", prompt.encode("utf-8"))
    add("stream", "BOOL", stream)
    add("sampling_parameters", "BYTES", json.dumps(sampling).encode())
    add("exclude_input_in_output", "BOOL", True)
    for flag in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"):
        add(flag, "BOOL", True)
    return tensors


class LLMClient:
    def __init__(self, url: str = "localhost:8001", model: str = "tiny-qwen2"):
        self.url = url
        self.model = model
        self.client = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self.client.close()

    def generate(self, prompt: str, **sampling) -> GenerationResult:
        """Non-streaming: one ModelInfer call."""
        start = time.monotonic()
        result = self.client.infer(self.model, build_inputs(prompt, False, sampling))
        out = GenerationResult(text=result.as_numpy("text_output")[0].decode("utf-8"))
        self._read_counts(out, result)
        out.latency_s = out.ttft_s = time.monotonic() - start
        return out

    def stream(self, prompt: str, timeout: float | None = None, **sampling) -> Iterator[str]:
        """Streams text pieces as they come; .result holds the totals and timings so far.

        Raises the server's error (InferenceServerException), or TimeoutError when no response
        comes within `timeout` seconds. Closing the iterator early (break) cancels the request."""
        responses: queue.Queue = queue.Queue()
        self.result = GenerationResult()
        start = time.monotonic()
        self.client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            self.client.async_stream_infer(self.model, build_inputs(prompt, True, sampling))
            while True:
                try:
                    result, error = responses.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"no response from {self.url} within {timeout} s") from None
                if error is not None:
                    raise error
                now = time.monotonic() - start
                text = result.as_numpy("text_output")
                piece = text[0].decode("utf-8") if text is not None else ""
                tokens_before = self.result.num_output_tokens
                self._read_counts(self.result, result, accumulate=True)
                if piece or self.result.num_output_tokens > tokens_before:
                    if not self.result.piece_times:
                        self.result.ttft_s = now
                    self.result.piece_times.append(now)
                if piece:
                    self.result.text += piece
                    yield piece
                if result.get_response().parameters["triton_final_response"].bool_param:
                    self.result.latency_s = now
                    return
        finally:
            self.client.stop_stream(cancel_requests=True)

    def stream_all(self, prompt: str, timeout: float | None = None, **sampling) -> GenerationResult:
        """Streams one request to its end; returns its text, counts and timings."""
        for _ in self.stream(prompt, timeout=timeout, **sampling):
            pass
        return self.result

    @staticmethod
    def _read_counts(out: GenerationResult, result, accumulate: bool = False) -> None:
        reason = result.as_numpy("finish_reason")
        if reason is not None:
            out.finish_reason = reason[0].decode()
        n_in = result.as_numpy("num_input_tokens")
        if n_in is not None:
            out.num_input_tokens = int(n_in[0])
        n_out = result.as_numpy("num_output_tokens")
        if n_out is not None:
            out.num_output_tokens = out.num_output_tokens + int(n_out[0]) if accumulate else int(n_out[0])


__all__ = ["GenerationResult", "LLMClient", "InferenceServerException", "build_inputs"]

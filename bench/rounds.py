"""The benchmarks' rounds: each class holds one system warm and times one round of a workload on
it, so a script can set systems against each other round for round (bench/measurements.py).

  EngineRounds  pdserve's engine in this process (LLMEngine)
  ServerRounds  a pdserve server and a tritonclient streaming client (bench/perf_analyzer_rounds.py
                drives the same server with perf_analyzer)
  DecodeSteps   an engine holding a prefilled batch: the decode step at a given context length
"""
from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import threading
import time


def median_round(rounds: list[dict]) -> dict:
    """The round with the median wall time, plus every round's figures for the record."""
    ordered = sorted(rounds, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "all_seconds": [round(r["seconds"], 3) for r in rounds]}


def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random token ids as text, re-encoded: every path sees the same ids; lengths about `length`."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    prompts = []
    for _ in range(n):
        text = tokenizer.decode([rng.choice(vocab) for _ in range(length)])
        ids = tokenizer.encode(text)[:length]
        prompts.append(ids)
    return prompts


# Every round repeats the same prompts; with prefix caching on, rounds after the first would
# skip their prefills. The throughput workload includes them (vLLM runs it with
# enable_prefix_caching=False, bench/vs_vllm.py), so the engine and the server run without it.
PREFIX_CACHING = False
# The step's token budget (max_num_batched_tokens) on every side of a throughput comparison:
# vLLM-CPU's own default for offline use (its LLM class: 4096 tokens, 256 sequences), which
# bench/vs_vllm.py also passes to vLLM explicitly. pdserve's served default (256) favours
# latency: running streams wait at most one 256-token piece of a prompt per step.
STEP_TOKENS = 4096


class EngineRounds:
    """pdserve's engine in this process (LLMEngine), warmed up; round() runs a batch to the end."""

    def __init__(self, model: str, dtype: str, device: str, output_len: int):
        from pdserve.engine.config import EngineConfig
        from pdserve.engine.llm_engine import LLMEngine
        from pdserve.engine.sequence import SamplingParams

        self.output_len = output_len
        self.engine = LLMEngine(EngineConfig(model_path=model, dtype=dtype, device=device, kv_cache_blocks=4096,
                                             max_model_len=1024, max_num_seqs=256, max_num_batched_tokens=STEP_TOKENS,
                                             enable_prefix_caching=PREFIX_CACHING))
        self.params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self.engine.add_request("warm", [11, 12, 13, 14], SamplingParams(max_tokens=4, temperature=0.0,
                                                                         ignore_eos=True))
        while self.engine.has_work():
            self.engine.step()

    def round(self, batch: list[list[int]]) -> dict:
        engine = self.engine
        for i, token_ids in enumerate(batch):   # the same token ids every system gets
            engine.add_request(f"r{i}", token_ids, self.params)
        decode_times, prefill_time = [], 0.0
        tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(batch))}
        start = time.perf_counter()
        while engine.has_work():
            t = time.perf_counter()
            prefill = engine.scheduler.waiting_prefill_tokens > 0
            outputs = engine.step()
            dt = time.perf_counter() - t
            for out in outputs:
                tokens[out.request_id] += list(out.token_ids)
            if prefill:
                prefill_time += dt
            elif len(outputs) == len(batch):
                decode_times.append(dt)
        wall = time.perf_counter() - start
        return {"requests": len(batch), "seconds": wall, "output_tokens_per_s": len(batch) * self.output_len / wall,
                "prefill_seconds": prefill_time,
                "decode_step_ms": 1000 * statistics.mean(decode_times) if decode_times else None,
                "token_ids": [tokens[f"r{i}"] for i in range(len(batch))]}


def split_token_ids(rounds: list[dict]) -> list[list[int]]:
    """Takes the generated ids out of the engine rounds' figures; returns the first round's."""
    return [r.pop("token_ids") for r in rounds][0]


class ServerRounds:
    """A pdserve server (one BOTH engine) and a tritonclient streaming client; round() sends every
    prompt at once over one ModelStreamInfer stream and waits for every final response."""

    def __init__(self, model: str, dtype: str, device: str, output_len: int, stream_interval: int = 1,
                 server_args: tuple[str, ...] = ()):
        import tritonclient.grpc as grpcclient
        from pdserve_testing.harness import PdServer, config_text

        self.repo = tempfile.mkdtemp(prefix="pdserve-bench-")
        os.makedirs(os.path.join(self.repo, "bench"))
        os.symlink(os.path.abspath(model), os.path.join(self.repo, "bench", "1"))
        with open(os.path.join(self.repo, "bench", "config.pbtxt"), "w") as f:
            f.write(config_text(role_groups=(("BOTH", device),), dtype=dtype, kv_cache_blocks=4096,
                                max_model_len=1024, max_num_seqs=256, max_num_batched_tokens=STEP_TOKENS,
                                enable_prefix_caching=str(PREFIX_CACHING).lower(), stream_interval=stream_interval))
        self.server = PdServer(self.repo, mode="none", extra_args=server_args).start()
        self.params = {"max_tokens": output_len, "temperature": 0, "ignore_eos": True}
        try:
            self.server.wait_ready("bench", timeout=300)
            self.client = grpcclient.InferenceServerClient(self.server.url)
        except BaseException:
            self.close()
            raise

    def round(self, texts: list[str]) -> dict:
        """Every prompt at once on one stream. The responses are counted in tritonclient's
        callback, on its stream thread, as a client that keeps up does: the client shares this
        VM's cores with the server (in production it is on another machine), so it hands no
        response to a second thread."""
        from pdserve_testing.harness import inputs

        client = self.client
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        tokens: dict[str, int] = {}
        state = {"done": 0, "responses": 0, "error": None}
        finished = threading.Event()

        def on_response(result, error):
            now = time.perf_counter()
            if error is not None:
                state["error"] = error
                finished.set()
                return
            response = result.get_response()
            state["responses"] += 1
            first.setdefault(response.id, now)
            last[response.id] = now
            tokens[response.id] = tokens.get(response.id, 0) + int(result.as_numpy("num_output_tokens")[0])
            if response.parameters["triton_final_response"].bool_param:
                state["done"] += 1
                if state["done"] == len(texts):
                    finished.set()

        client.start_stream(callback=on_response)
        start = time.perf_counter()
        for i, text in enumerate(texts):
            client.async_stream_infer("bench", inputs(text, True, self.params, return_num_output_tokens=True),
                                      request_id=str(i))
        if not finished.wait(timeout=600):
            raise TimeoutError(f"{state['done']} of {len(texts)} requests finished within 600 s")
        client.stop_stream()
        if state["error"] is not None:
            raise state["error"]
        wall = max(last.values()) - start   # the last response, as the callback saw it
        tpots = [(last[r] - first[r]) / (tokens[r] - 1) for r in first]
        return {"seconds": wall, "output_tokens_per_s": sum(tokens.values()) / wall,
                "tokens_per_response": sum(tokens.values()) / state["responses"],
                "ttft_s_median": statistics.median(first[r] - start for r in first),
                "tpot_ms_median": 1000 * statistics.median(tpots)}

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        self.server.stop()
        shutil.rmtree(self.repo, ignore_errors=True)


class DecodeSteps:
    """An engine holding `batch` sequences of `context` prompt tokens, prefilled; measure(n)
    times its next n decode steps of the whole batch (median ms). options: more EngineConfig
    fields (quantization, ...)."""

    def __init__(self, model: str, dtype: str, device: str, context: int, batch: int = 32, max_steps: int = 128,
                 **options):
        from pdserve.engine.config import EngineConfig
        from pdserve.engine.llm_engine import LLMEngine
        from pdserve.engine.sequence import SamplingParams

        block = 16
        length = context + max_steps + 2 * block
        self.batch = batch
        self.engine = LLMEngine(EngineConfig(model_path=model, dtype=dtype, device=device,
                                             kv_cache_blocks=batch * (length // block + 1), max_model_len=length,
                                             max_num_seqs=batch, max_num_batched_tokens=max(8192, context),
                                             **options))
        params = SamplingParams(max_tokens=max_steps + 2, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(make_prompts(self.engine.tokenizer, batch, context, seed=1)):
            self.engine.add_request(f"c{i}", p, params)
        while self.engine.scheduler.waiting_prefill_tokens > 0:
            self.engine.step()
        self.engine.step()   # the first decode step of the batch (it may still hold a prefill's tail)

    def measure(self, steps: int) -> float:
        times = []
        while len(times) < steps and self.engine.has_work():
            t = time.perf_counter()
            outputs = self.engine.step()
            if len(outputs) == self.batch:
                times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

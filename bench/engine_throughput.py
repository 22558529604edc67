"""Engine throughput on the reference workload (32 x 256 prompt x 128 greedy tokens), against
transformers, in one run.

Workload: 32 requests x 256 prompt tokens x 128 greedy output tokens (ignore_eos), offline.
Measured in this one process, one after the other, on the same machine:
  - pdserve's engine in-process (LLMEngine), and a sweep of batch sizes;
  - pdserve through the server (a pdserve process, tritonclient streaming, all requests at once),
    with each request's TPOT seen by the client against the engine's own decode step time;
  - transformers' generate_batch (continuous batching), and a raw transformers forward loop
    at the same batch size (prefill, then one forward per decode step with its KV cache).

    python bench/engine_throughput.py [--dtype float32] [--device cpu] [--json bench/out/engine.json]

bench/vs_vllm.py reuses bench_engine, bench_engine_and_server and decode_step_ms (the decode step at a given
context length, for the long-context target) from here.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

ROUNDS = 3  # each measurement repeats; the median round is reported (the machine is shared and noisy)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


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


def bench_engine(model: str, dtype: str, device: str, prompts: list[list[int]], output_len: int,
                 sweep: bool = True, return_tokens: bool = False) -> dict:
    bench = EngineRounds(model, dtype, device, output_len)
    rounds = [bench.round(prompts) for _ in range(ROUNDS)]
    token_ids = split_token_ids(rounds)
    main = median_round(rounds)
    sizes = []
    for batch_size in ((1, 8, 16, 32, 64) if sweep else ()):
        batch = (prompts * (batch_size // len(prompts) + 1))[:batch_size]
        sizes.append(bench.round(batch))
        sizes[-1].pop("token_ids")
    report = {"workload": {**main, "rounds": rounds}, "sweep": sizes,
              "prompt_tokens_mean": statistics.mean(len(p) for p in prompts)}
    if return_tokens:
        report["token_ids"] = token_ids
    return report


class ServerRounds:
    """A pdserve server (one BOTH engine) and a tritonclient streaming client; round() sends every
    prompt at once over one ModelStreamInfer stream and waits for every final response."""

    def __init__(self, model: str, dtype: str, device: str, output_len: int, stream_interval: int = 1,
                 server_args: tuple[str, ...] = ()):
        import tritonclient.grpc as grpcclient
        from harness import PdServer, config_text

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
        from harness import inputs

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


def bench_server(model: str, dtype: str, device: str, prompts_text: list[str], output_len: int) -> dict:
    bench = ServerRounds(model, dtype, device, output_len)
    try:
        bench.round(prompts_text[:2])  # warm-up
        rounds = [bench.round(prompts_text) for _ in range(ROUNDS)]
        return {**median_round(rounds), "rounds": rounds}
    finally:
        bench.close()


def bench_engine_and_server(model: str, dtype: str, device: str, prompts: list[list[int]], texts: list[str],
                            output_len: int, rounds: int = 5, stream_interval: int = 1,
                            client: str = "tritonclient", server_args: tuple[str, ...] = ()) -> dict:
    """The engine in-process and the server, round for round in turn (engine, server, engine,
    ..., server, engine), both kept warm: this shared VM's speed drifts by more than 10% within
    minutes, so the server / engine ratio is taken round by round, each server round against the
    mean of the engine rounds just before and just after it (which cancels a drift that is steady
    over the three), and the median of those ratios is the figure. client: "tritonclient"
    (Python, ServerRounds) or "perf_analyzer" (C++, perf_analyzer_rounds)."""
    engine = EngineRounds(model, dtype, device, output_len)
    if client == "perf_analyzer":
        from perf_analyzer_rounds import PerfAnalyzerRounds
        server = PerfAnalyzerRounds(model, dtype, device, output_len, stream_interval, server_args)
    else:
        server = ServerRounds(model, dtype, device, output_len, stream_interval, server_args)
    try:
        server.round(texts[:2])  # warm-up
        engine_rounds, server_rounds = [], []
        for _ in range(rounds):
            engine_rounds.append(engine.round(prompts))
            server_rounds.append(server.round(texts))
        engine_rounds.append(engine.round(prompts))
    finally:
        server.close()
    token_ids = split_token_ids(engine_rounds)
    engine_tok_s = [e["output_tokens_per_s"] for e in engine_rounds]
    ratios = [s["output_tokens_per_s"] / ((engine_tok_s[i] + engine_tok_s[i + 1]) / 2)
              for i, s in enumerate(server_rounds)]
    return {"engine": {**median_round(engine_rounds), "rounds": engine_rounds},
            "server": {**median_round(server_rounds), "rounds": server_rounds},
            "server_over_engine": {"median": statistics.median(ratios), "pairs": [round(r, 3) for r in ratios]},
            "token_ids": token_ids}


class DecodeSteps:
    """An engine holding `batch` sequences of `context` prompt tokens, prefilled; measure(n)
    times its next n decode steps of the whole batch (median ms)."""

    def __init__(self, model: str, dtype: str, device: str, context: int, batch: int = 32, max_steps: int = 128):
        from pdserve.engine.config import EngineConfig
        from pdserve.engine.llm_engine import LLMEngine
        from pdserve.engine.sequence import SamplingParams

        block = 16
        length = context + max_steps + 2 * block
        self.batch = batch
        self.engine = LLMEngine(EngineConfig(model_path=model, dtype=dtype, device=device,
                                             kv_cache_blocks=batch * (length // block + 1), max_model_len=length,
                                             max_num_seqs=batch, max_num_batched_tokens=max(8192, context)))
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


def decode_step_ms(model: str, dtype: str, device: str, context: int, batch: int = 32, steps: int = 16) -> float:
    """The engine's decode step (median ms) for `batch` sequences holding `context` tokens each."""
    return DecodeSteps(model, dtype, device, context, batch, steps).measure(steps)


def long_context_ratio(model: str, dtype: str, device: str, contexts: tuple[int, int] = (256, 1024),
                       batch: int = 32, steps: int = 8, rounds: int = 5) -> dict:
    """The decode step at the long context against the short one, measured in turn (short, long,
    short, ...) with both engines kept warm, as bench_engine_and_server does: this VM's speed
    drifts within seconds, and two steps measured minutes apart made the ratio swing by 30%.
    Returns each context's median step and the median of the rounds' ratios."""
    short, long = (DecodeSteps(model, dtype, device, c, batch, steps * rounds) for c in contexts)
    pairs = [(short.measure(steps), long.measure(steps)) for _ in range(rounds)]
    return {str(contexts[0]): statistics.median(a for a, _ in pairs),
            str(contexts[1]): statistics.median(b for _, b in pairs),
            "ratio": statistics.median(b / a for a, b in pairs),
            "pairs": [[round(a, 1), round(b, 1)] for a, b in pairs]}


def bench_hf(model: str, dtype: str, prompts: list[list[int]], output_len: int, device: str = "cpu") -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    out: dict = {}
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    hf.generate_batch(inputs=[prompts[0][:16]], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0))
    start = time.perf_counter()
    results = hf.generate_batch(inputs=prompts, generation_config=config)
    wall = time.perf_counter() - start
    generated = sum(len(r.generated_tokens) for r in results.values())
    out["generate_batch"] = {"seconds": wall, "output_tokens_per_s": generated / wall, "output_tokens": generated}

    # Raw forward loop: all prompts padded to the same length (they are ~equal), KV cache, greedy.
    width = min(len(p) for p in prompts)
    ids = torch.tensor([p[:width] for p in prompts], device=device)
    with torch.inference_mode():
        start = time.perf_counter()
        cache = DynamicCache()
        logits = hf(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(output_len - 1):
            t = time.perf_counter()
            logits = hf(input_ids=logits.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True).logits[:, -1]
            steps.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
    out["raw_forward"] = {"seconds": wall, "output_tokens_per_s": len(prompts) * output_len / wall,
                          "prefill_seconds": prefill, "decode_step_ms": 1000 * statistics.mean(steps)}
    return out


def plot(report: dict, path: str) -> None:
    """Throughput and decode step time over batch size, and the systems side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    if "engine" in report:
        sweep = report["engine"]["sweep"]
        sizes = [r["requests"] for r in sweep]
        axes[0].plot(sizes, [r["output_tokens_per_s"] for r in sweep], "o-", label="output tok/s")
        ax2 = axes[0].twinx()
        ax2.plot(sizes, [r["decode_step_ms"] for r in sweep], "s--", color="tab:red", label="decode step (ms)")
        ax2.set_ylabel("decode step (ms)")
        axes[0].set(title="pdserve engine over batch size", xlabel="concurrent requests", ylabel="output tok/s")
        axes[0].legend(loc="upper left")
        ax2.legend(loc="lower right")
    bars = {}
    if "transformers" in report:
        bars["generate_batch"] = report["transformers"]["generate_batch"]["output_tokens_per_s"]
        bars["raw forward"] = report["transformers"]["raw_forward"]["output_tokens_per_s"]
    if "engine" in report:
        bars["pdserve engine"] = report["engine"]["workload"]["output_tokens_per_s"]
    if "server" in report:
        bars["pdserve server"] = report["server"]["output_tokens_per_s"]
    axes[1].bar(list(bars), list(bars.values()), color="tab:blue")
    axes[1].set(title=f"32 x 256 prompt x 128 output, {report['dtype']}", ylabel="output tok/s")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model_repository", "tiny-qwen2", "1"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip", action="append", default=[], choices=["engine", "server", "hf"])
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "engine_throughput.json"))
    args = ap.parse_args()

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = make_prompts(tokenizer, args.num_requests, args.prompt_len)
    texts = [tokenizer.decode(p) for p in prompts]
    report: dict = {"torch_threads": torch.get_num_threads(), "dtype": args.dtype, "device": args.device,
                    "cpu": os.uname().machine, "cores": os.cpu_count(), "args": vars(args)}
    if "hf" not in args.skip:
        report["transformers"] = bench_hf(args.model, args.dtype, prompts, args.output_len, args.device)
        print(json.dumps(report["transformers"], indent=1), flush=True)
    if "engine" not in args.skip:
        report["engine"] = bench_engine(args.model, args.dtype, args.device, prompts, args.output_len)
        print(json.dumps(report["engine"], indent=1), flush=True)
    if "server" not in args.skip:
        report["server"] = bench_server(args.model, args.dtype, args.device, texts, args.output_len)
        print(json.dumps(report["server"], indent=1), flush=True)
    if "engine" in report and "server" in report:
        step = report["engine"]["workload"]["decode_step_ms"]
        report["server_tpot_over_engine_step"] = report["server"]["tpot_ms_median"] / step
    if "engine" in report and "transformers" in report:
        report["engine_over_generate_batch"] = (report["engine"]["workload"]["output_tokens_per_s"]
                                                / report["transformers"]["generate_batch"]["output_tokens_per_s"])
    if "server" in report and "transformers" in report:
        report["server_over_generate_batch"] = (report["server"]["output_tokens_per_s"]
                                                / report["transformers"]["generate_batch"]["output_tokens_per_s"])
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.splitext(args.json)[0] + ".png")
    for key in ("engine_over_generate_batch", "server_over_generate_batch", "server_tpot_over_engine_step"):
        if key in report:
            print(f"{key}: {report[key]:.2f}")


if __name__ == "__main__":
    main()

"""What issue 29's generation features (penalties, logit_bias, min_p, logprobs, bad_words,
constrained decoding, ...) cost a request that sets none of them, against the code before them
(BEFORE = 1301965, the last commit without them), in one run:

  hooks    the Python HEAD's features added to every step, alone (structured outputs' hooks; the
           sampled path's checks for log-probabilities, bad words, bias, penalties, min_p)
  sampler  the per-step code the features touched, on the same logits: BEFORE's Sampler.sample
           against HEAD's with the engine's feature hooks around it (structured outputs'
           begin_step / mask hook / end_step, the per-token accept and log-probability hand-off),
           32 rows, vocabulary 8192 (demo) and 151936 (Qwen2.5-0.5B), float32 and bfloat16 logits,
           greedy and temperature/top-p rows, nothing else set. Blocks of calls alternate between
           the two; the figures are medians over the blocks' pairs.
  engine   the reference workload (32 x 256 prompt x 128 greedy tokens, in-process LLMEngine as
           bench/rounds.EngineRounds runs it) with HEAD's tree against BEFORE's, each a worker
           process with its own tree on PYTHONPATH, rounds taking turns (ABBA), ratio HEAD / BEFORE
           as the median of the pairs. HEAD also holds every engine change since BEFORE (kernels).

BEFORE's tree must be unpacked and built first (its kernels build at install):

    git archive 1301965 | tar -x -C /tmp/pre29
    (cd /tmp/pre29 && python protos/generate.py && python setup.py build_ext --inplace)
    python bench/features_overhead.py --model DIR --before-tree /tmp/pre29 [--part hooks|sampler|engine] [--pairs 7]

The sampler cases, and each dtype's engine pairs, hold /tmp/pdserve-cpu.lock (as `flock` does),
so it never overlaps another CPU-heavy job on the shared machine.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as pdserve starts its engines (read when torch loads)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "1301965"
LOCK = "/tmp/pdserve-cpu.lock"
NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN = 32, 256, 128   # the reference workload
VOCABS = (8192, 151936)


@contextlib.contextmanager
def cpu_lock():
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- sampler ---------------------------------------------------------------------------------------
def before_sampler_module():
    """BEFORE's engine/sampler.py, loaded from git beside HEAD's pdserve (it imports only Sequence)."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{BEFORE}:server/pdserve/engine/sampler.py"],
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("before_sampler", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{BEFORE}:sampler.py", "exec"), module.__dict__)
    return module


def make_seqs(sampled: bool):
    import random
    from pdserve.engine.sequence import SamplingParams, Sequence
    rng = random.Random(0)
    params = (SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.8, top_p=0.95) if sampled
              else SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0))
    seqs = []
    for i in range(NUM_REQUESTS):
        seq = Sequence(f"r{i}", [rng.randrange(8192) for _ in range(PROMPT_LEN)], params)
        seq.output_token_ids = [rng.randrange(8192) for _ in range(64)]
        seqs.append(seq)
    return seqs


def head_step(sampler, structured, logits, seqs, eos_ids):
    """HEAD's per-step sampling path as LLMEngine.step runs it, feature hooks included."""
    structured.begin_step(seqs)
    tokens = sampler.sample(logits, seqs, eos_ids)
    structured.end_step()
    for seq, token in zip(seqs, tokens):   # LLMEngine._append's per-token feature lines
        structured.accept(seq.request_id, token)
        _lp, seq.new_logprobs = (seq.new_logprobs,) if seq.new_logprobs else (), None
        _plp = tuple(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else ()
    return tokens


def time_calls(fn, calls: int) -> float:
    """Median microseconds of one call over `calls` calls."""
    times = []
    for _ in range(calls):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def bench_sampler(blocks: int) -> list[dict]:
    before = before_sampler_module()
    rows = []
    with cpu_lock():   # one hold for every case: the lock is contended, and the cases take about 2 minutes
        for vocab in VOCABS:
            for dtype in ("float32", "bfloat16"):
                for sampled in (False, True):
                    rows.append(sampler_case(before, vocab, dtype, sampled, blocks))
    return rows


def hooks_alone(blocks: int) -> list[dict]:
    """The Python that HEAD's features added to every step, alone, with no request setting one:
    structured outputs' hooks, and the sampled path's checks (log-probability rows, bad words,
    logit bias, penalties, min_p), over 32 sampled rows."""
    import torch
    from pdserve.engine.sampler import Sampler, bad_word_bans
    from pdserve.engine.structured import StructuredOutputs
    seqs, tokens = make_seqs(True), list(range(NUM_REQUESTS))
    structured, sampler = StructuredOutputs(None, 8192, {0}), Sampler(torch.device("cpu"))
    logits = torch.zeros(NUM_REQUESTS, 8)

    def hooks():
        structured.begin_step(seqs)
        structured.apply(logits, seqs)
        structured.end_step()
        for seq, token in zip(seqs, tokens):
            structured.accept(seq.request_id, token)

    def checks():
        all(seq.params.plain_greedy for seq in seqs)
        [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        bad_word_bans(seqs)
        sampler._apply_bias_and_penalties(logits, seqs)
        any(seq.params.min_p > 0 for seq in seqs)
    rows = []
    for name, fn in (("structured-output hooks", hooks), ("sampled path's feature checks", checks)):
        times = [time_calls(fn, 2000) for _ in range(blocks)]
        print(f"  HEAD's {name} of a 32-row step, alone: {statistics.median(times):.1f} us "
              f"({min(times):.1f}..{max(times):.1f})", flush=True)
        rows.append({"case": f"{name} alone", "head_us": statistics.median(times)})
    return rows


def sampler_case(before, vocab: int, dtype: str, sampled: bool, blocks: int) -> dict:
    import torch
    from pdserve.engine.sampler import Sampler
    from pdserve.engine.structured import StructuredOutputs

    eos_ids = {0}
    torch.manual_seed(0)
    logits = (torch.randn(NUM_REQUESTS, vocab) * 3).to(getattr(torch, dtype))
    seqs = make_seqs(sampled)
    old, new = before.Sampler(torch.device("cpu")), Sampler(torch.device("cpu"))
    structured = StructuredOutputs(None, vocab, eos_ids)   # no constrained request: no grammar built
    new.constrain = structured.apply
    run_old = lambda: old.sample(logits, seqs, eos_ids)
    run_new = lambda: head_step(new, structured, logits, seqs, eos_ids)
    if not sampled:
        assert run_old() == run_new()
    calls = max(3, int(2e7 // (vocab * NUM_REQUESTS * (8 if sampled else 1))))
    run_old(), run_new()   # warm-up
    pairs = []
    for b in range(blocks):
        if b % 2:
            t_new, t_old = time_calls(run_new, calls), time_calls(run_old, calls)
        else:
            t_old, t_new = time_calls(run_old, calls), time_calls(run_new, calls)
        pairs.append((t_old, t_new))
    diffs = [n - o for o, n in pairs]
    row = {"vocab": vocab, "logits": dtype, "rows": "temperature 0.8, top_p 0.95" if sampled else "greedy",
           "calls_per_block": calls, "before_us": statistics.median(o for o, _ in pairs),
           "head_us": statistics.median(n for _, n in pairs), "head_minus_before_us": statistics.median(diffs),
           "diff_range_us": (min(diffs), max(diffs)), "head_over_before": statistics.median(n / o for o, n in pairs)}
    print(f"  vocab {vocab:6d} {dtype:8s} {row['rows']:28s} before {row['before_us']:9.1f} us  "
          f"HEAD {row['head_us']:9.1f} us  HEAD-before {row['head_minus_before_us']:+8.1f} us "
          f"(pairs {min(diffs):+.1f}..{max(diffs):+.1f})  ratio {row['head_over_before']:.3f}", flush=True)
    return row


# ---- engine ----------------------------------------------------------------------------------------
def worker(tree: str, model: str, dtype: str) -> None:
    """One tree's engine held warm; each stdin line (a JSON list of prompts) is one round."""
    sys.path.insert(0, os.path.join(tree, "bench"))
    import pdserve
    from rounds import EngineRounds   # the tree's own (the same class in both trees)
    rounds = EngineRounds(model, dtype, "cpu", OUTPUT_LEN)
    print(json.dumps({"pdserve": pdserve.__file__}), flush=True)
    for line in sys.stdin:
        result = rounds.round(json.loads(line))
        print(json.dumps(result), flush=True)


class Worker:
    def __init__(self, tree: str, model: str, dtype: str):
        env = {**os.environ, "PYTHONPATH": os.path.join(tree, "server")}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", tree, "--model", model,
                                      "--dtypes", dtype], cwd=tree, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        where = json.loads(self.proc.stdout.readline())["pdserve"]
        if not where.startswith(os.path.join(tree, "server")):
            raise RuntimeError(f"the worker for {tree} imported pdserve from {where}")

    def round(self, prompts: list[list[int]]) -> dict:
        self.proc.stdin.write(json.dumps(prompts) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run_pairs(sides: dict, rounds: dict, prompts: list[list[int]], dtype: str, pairs: int) -> None:
    for side in sides.values():
        side.round(prompts)   # warm-up round
    for p in range(pairs):
        for name in (("before", "head") if p % 2 == 0 else ("head", "before")):
            rounds[name].append(sides[name].round(prompts))
        b, h = rounds["before"][-1], rounds["head"][-1]
        print(f"  {dtype} pair {p + 1}: before {b['output_tokens_per_s']:.0f} tok/s "
              f"(decode step {b['decode_step_ms']:.1f} ms), HEAD {h['output_tokens_per_s']:.0f} tok/s "
              f"({h['decode_step_ms']:.1f} ms): {h['output_tokens_per_s'] / b['output_tokens_per_s']:.3f}", flush=True)


def bench_engine(model: str, before_tree: str, dtypes: list[str], pairs: int) -> list[dict]:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from rounds import make_prompts
    from transformers import AutoTokenizer
    prompts = make_prompts(AutoTokenizer.from_pretrained(model), NUM_REQUESTS, PROMPT_LEN)
    out = []
    for dtype in dtypes:
        # one hold per dtype (a few minutes): the lock is contended, and a wait between pairs
        # would only let the machine's speed drift further between them
        with cpu_lock():
            sides = {"before": Worker(before_tree, model, dtype), "head": Worker(ROOT, model, dtype)}
            rounds = {"before": [], "head": []}
            try:
                run_pairs(sides, rounds, prompts, dtype, pairs)
            finally:
                for side in sides.values():
                    side.close()
        tok_s = {k: [r["output_tokens_per_s"] for r in v] for k, v in rounds.items()}
        step = {k: [r["decode_step_ms"] for r in v] for k, v in rounds.items()}
        same = sum(b == h for b, h in zip(rounds["before"][0]["token_ids"], rounds["head"][0]["token_ids"]))
        out.append({"dtype": dtype, "pairs": pairs,
                    "before_tok_s": statistics.median(tok_s["before"]), "head_tok_s": statistics.median(tok_s["head"]),
                    "head_over_before": statistics.median(h / b for b, h in zip(tok_s["before"], tok_s["head"])),
                    "pair_ratios": [round(h / b, 3) for b, h in zip(tok_s["before"], tok_s["head"])],
                    "before_decode_step_ms": statistics.median(step["before"]),
                    "head_decode_step_ms": statistics.median(step["head"]),
                    "step_ratio": statistics.median(h / b for b, h in zip(step["before"], step["head"])),
                    "same_tokens": f"{same}/{NUM_REQUESTS}"})
        print(f"  {dtype}: HEAD / before {out[-1]['head_over_before']:.3f} (pairs {out[-1]['pair_ratios']}), "
              f"same tokens {same}/{NUM_REQUESTS}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a random-weights demo model (tools/make_demo_model.py DIR)")
    ap.add_argument("--before-tree", default="/tmp/pre29")
    ap.add_argument("--part", action="append", choices=["hooks", "sampler", "engine"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--blocks", type=int, default=9, help="alternating blocks of calls per sampler case")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "features_overhead.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.dtypes)
        return
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from vs_vllm import cpu_info, describe_cpu
    import torch
    report = {"cpu": cpu_info(), "torch_threads": torch.get_num_threads(), "head": subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "before": BEFORE, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
    print(f"CPU: {describe_cpu(report['cpu'])}; torch threads {report['torch_threads']}; HEAD {report['head']} "
          f"against {BEFORE}", flush=True)
    parts = args.part or ["hooks", "sampler", "engine"]
    if "hooks" in parts:
        print("per-step feature code, nothing set:", flush=True)
        with cpu_lock():
            report["hooks"] = hooks_alone(args.blocks)
    if "sampler" in parts:
        print("sampler step, 32 rows, nothing set:", flush=True)
        report["sampler"] = bench_sampler(args.blocks)
    if "engine" in parts:
        print("engine rounds, 32 x 256 x 128 greedy:", flush=True)
        report["engine"] = bench_engine(args.model, args.before_tree, args.dtypes.split(","), args.pairs)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

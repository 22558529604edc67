"""The ranks of one tensor-parallel instance: how they start and join, the collectives the model
and the runner use, and the loop of a rank that is not rank 0.

    python -m pdserve.engine.ranks --spec-json '{...}' --rank R --store HOST:PORT

Rank 0 is the engine worker the supervisor starts (engine/worker.py); it owns the scheduler, the
engine RPC, the etcd record and the metrics. Before it opens its device it starts the other
ranks (start_followers), one process per device, and they join a torch.distributed group (gloo
on CPU, NCCL on CUDA, HCCL on NPU) through a TCPStore rank 0 serves. Every step rank 0
broadcasts the step's flat batch (the model's inputs and attention metadata) and every rank runs
the same forward over its shard (engine/parallel.py says which); only rank 0 samples.

PD: every rank registers its own KV pool with its own transport (share_pool). A PREFILL
instance's step carries the blocks it pushes; each rank writes the KV heads it holds of them
and reports to rank 0, which answers the decode engine once all have landed. A DECODE
instance's ranks are written into directly; rank 0 names their pools in each destination.

Faults take the whole instance down, never leave it hanging: every collective has a bounded
timeout (PDSERVE_TP_TIMEOUT) and a rank whose collective fails exits at once; rank 0 exits when
a follower process ends; followers die with rank 0 (parent-death signal) and notice a rank 0
that stopped broadcasting (it sends a heartbeat while idle). The supervisor then restarts the
instance as it restarts any engine, and the streams rank 0 held end with UNAVAILABLE.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.common import cpu_priority
from pdserve.common.devices import parse_device
from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.kv_connector import LayerPush, PendingSend
from pdserve.engine.kv_transport import KVPool, make_transport
from pdserve.engine.parallel import SHARDED_MODEL_TYPES, Shard, model_shape, split
from pdserve.engine.spec import WorkerSpec

log = logging.getLogger("pdserve.engine.ranks")

TP_TIMEOUT_S = float(os.environ.get("PDSERVE_TP_TIMEOUT", "60"))            # any one collective
TP_JOIN_TIMEOUT_S = float(os.environ.get("PDSERVE_TP_JOIN_TIMEOUT", "120"))  # the ranks' processes starting
HEARTBEAT_S = TP_TIMEOUT_S / 6    # an idle rank 0 broadcasts this often, so a follower's wait is bounded too
EXIT_RANK_LOST = 70
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


class RankGroup:
    """One rank's membership of its instance's group, and the collectives over it. A collective
    that fails (a peer died) or times out (a peer stalled) ends this process: the group cannot
    recover, and the supervisor restarts the instance whole."""

    def __init__(self, rank: int, size: int, device_kind: str, store: dist.Store):
        self.rank, self.size = rank, size
        self.heartbeat_s = HEARTBEAT_S
        self.stopping = False
        self.last_broadcast = time.monotonic()
        self._fail_if(lambda: dist.init_process_group(BACKENDS[device_kind], store=store, rank=rank, world_size=size,
                                                      timeout=timedelta(seconds=TP_TIMEOUT_S)), "joining the group")

    def _fail_if(self, collective, what: str):
        try:
            return collective()
        except Exception as exc:   # gloo: a closed peer or a timeout; NCCL/HCCL: their own errors
            if self.stopping:
                raise
            log.critical("rank %d of %d: %s failed (%s: %s); the instance goes down", self.rank, self.size, what,
                         type(exc).__name__, exc)
            logging.shutdown()
            os._exit(EXIT_RANK_LOST)

    # ---- what the model calls ------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._fail_if(lambda: dist.all_reduce(x), "an all-reduce")
        return x

    def gather_columns(self, x: torch.Tensor, width: int, total: int) -> torch.Tensor:
        """Every rank's columns of x side by side (each rank's padded to `width`), cut to `total`."""
        if x.shape[-1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._fail_if(lambda: dist.all_gather(parts, x.contiguous()), "a gather of the logits")
        return torch.cat(parts, dim=-1)[..., :total]

    def all_gather(self, value) -> list:
        """Every rank's value (a picklable object), in rank order."""
        parts = [None] * self.size
        self._fail_if(lambda: dist.all_gather_object(parts, value), "exchanging the ranks' KV pools")
        return parts

    def push_reports(self, report=None) -> list:
        """After a forward that pushed KV: the other ranks' outcomes (LayerPush.settle), for rank 0."""
        parts = [None] * self.size
        self._fail_if(lambda: dist.all_gather_object(parts, report), "gathering the ranks' KV writes")
        return parts[1:]

    def agree_min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's value (the KV pool's blocks: each rank sized its own)."""
        t = torch.tensor([value], dtype=torch.long, device=device)
        self._fail_if(lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN), "agreeing on the KV pool size")
        return int(t.item())

    # ---- the step broadcast ----------------------------------------------------------------------
    def send_step(self, payload) -> None:
        """Rank 0: the next step's batch (None: a heartbeat) to every other rank."""
        box = [payload]
        self._fail_if(lambda: dist.broadcast_object_list(box, src=0), "broadcasting a step")
        self.last_broadcast = time.monotonic()

    def heartbeat(self) -> None:
        """Rank 0, between steps: keeps the followers' wait for the next step within its timeout."""
        if time.monotonic() - self.last_broadcast >= HEARTBEAT_S:
            self.send_step(None)

    def receive_step(self):
        box = [None]
        self._fail_if(lambda: dist.broadcast_object_list(box, src=0), "waiting for rank 0's next step")
        return box[0]

    def close(self) -> None:
        self.stopping = True
        try:
            dist.destroy_process_group()
        except Exception:   # a peer already gone: nothing left to tear down politely
            pass


# ---- the model's shards -------------------------------------------------------------------------

class _RowParallel:
    """A row-parallel linear (O, down): each rank's partial product, summed over the ranks."""

    def __init__(self, linear, group: RankGroup):
        self.linear, self.group = linear, group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.linear(x))


class _VocabParallelHead:
    def __init__(self, linear, shard: Shard, vocab_size: int, group: RankGroup):
        self.linear, self.shard, self.vocab_size, self.group = linear, shard, vocab_size, group

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.group.gather_columns(self.linear(h), self.shard.vocab_per_rank, self.vocab_size)


class _VocabParallelEmbedding(torch.nn.Module):
    """The embedding rows of this rank's vocabulary; a token outside it contributes zeros, and
    the sum over the ranks is the whole table's row."""

    def __init__(self, embedding: torch.nn.Embedding, rows: range, group: RankGroup):
        super().__init__()
        self.embedding, self.rows, self.group = embedding, rows, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < self.rows.start) | (input_ids >= self.rows.stop)
        h = self.embedding(torch.where(outside, 0, input_ids - self.rows.start))
        h.masked_fill_(outside[:, None], 0)
        return self.group.all_reduce(h)


def parallelize(model, config, shard: Shard, group: RankGroup) -> None:
    """After prepare(kernels): the model's row-parallel linears reduce and its vocabulary is
    split (the Llama family's modules: engine/models/llama.py)."""
    if getattr(config, "model_type", "") not in SHARDED_MODEL_TYPES:
        raise ValueError(f"model_type '{getattr(config, 'model_type', '')}' does not shard; tensor parallelism "
                         f"serves {', '.join(SHARDED_MODEL_TYPES)}: use tensor_parallel_size 1")
    for layer in model.model.layers:
        layer.self_attn.out = _RowParallel(layer.self_attn.out, group)
        layer.mlp.down = _RowParallel(layer.mlp.down, group)
    model.model.embed_tokens = _VocabParallelEmbedding(model.model.embed_tokens, shard.vocab_rows, group)
    model.head = _VocabParallelHead(model.head, shard, config.vocab_size, group)
    model.vocab_size = config.vocab_size


def step_payload(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
    """What rank 0 broadcasts of a step: host tensors (a follower moves them to its own device),
    the metadata without its callbacks and rank 0's attention plan, and what the forward pushes to decode engines (each rank
    writes the KV heads it holds of the same blocks)."""
    fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta) if f.name not in ("after_layer", "progress", "decode_plan")}
    plan = meta.after_layer.plan() if meta.after_layer is not None else None
    return input_ids.cpu(), positions.cpu(), _moved(fields, torch.device("cpu")), plan


def share_pool(transport, runner, group: RankGroup) -> tuple[KVPool, ...]:
    """Every rank registers its own KV pool (the heads it holds) with its own transport; every
    rank learns all of them, so rank 0 can name each in a handoff's destination."""
    transport.register_pool(runner.kv_cache)
    num_kv_heads = model_shape(runner.hf_config)[1]
    heads = split(num_kv_heads, group.size, group.rank)
    transport.hold_heads(heads, num_kv_heads)
    mine = transport.handshake()
    pools = group.all_gather((mine["session"], mine["base_address"], mine["block_bytes"], mine["layer_stride"],
                              (heads.start, heads.stop)))
    return tuple(KVPool(*pool) for pool in pools)


def _moved(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    return value


# ---- rank 0: starting and watching the followers ------------------------------------------------

def store_for(rank: int, size: int, host: str, port: int = 0) -> dist.TCPStore:
    """The group's rendezvous: rank 0 serves it (port 0: any free port, then store.port), the others join."""
    return dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timedelta(seconds=TP_JOIN_TIMEOUT_S),
                         wait_for_workers=False)


def start_followers(spec: WorkerSpec, store: dist.TCPStore) -> list[subprocess.Popen]:
    """Ranks 1.. of the instance, one process each. Called from the main thread before rank 0
    opens its device: the parent-death signal follows the thread that forks, and a child inherits
    its parent's CPU affinity (rank 0 pins itself to its own core)."""
    setpriv = shutil.which("setpriv")
    procs = []
    for rank in range(1, len(spec.devices)):
        command = [sys.executable, "-m", "pdserve.engine.ranks", "--spec-json", spec.to_json(), "--rank", str(rank),
                   "--store", f"{spec.host}:{store.port}"]
        if setpriv:   # SIGKILL: a follower stopped (SIGSTOP) or stuck in a collective still goes
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        procs.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
    return procs


def watch_followers(procs: list[subprocess.Popen], group_of) -> None:
    """Rank 0 exits when a follower does (killed, crashed) unless rank 0 is stopping: the
    supervisor then restarts the instance whole. group_of() is the group, once joined."""
    def watch(rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        group = group_of()
        if group is not None and group.stopping:
            return
        log.critical("rank %d (pid %d) exited with code %s; the instance goes down", rank, proc.pid, code)
        logging.shutdown()
        os._exit(EXIT_RANK_LOST)
    for rank, proc in enumerate(procs, start=1):
        threading.Thread(target=watch, args=(rank, proc), name=f"rank-{rank}-watch", daemon=True).start()


def stop_followers(procs: list[subprocess.Popen], group: RankGroup | None) -> None:
    if group is not None:
        group.stopping = True
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- a follower --------------------------------------------------------------------------------

def follow(runner, group: RankGroup, transport=None) -> None:
    """Runs rank 0's steps over this rank's shard until rank 0 goes (its parent-death signal).
    A PREFILL instance's step may push KV: this rank writes its heads of those blocks after each
    layer, waits for them after the forward and reports to rank 0, which answers for all."""
    while True:
        payload = group.receive_step()
        if payload is None:
            continue
        *step, plan = payload
        input_ids, positions, fields = _moved(step, runner.device)
        push = LayerPush(transport, [(PendingSend(dest, math.inf, 0), src, dst) for dest, src, dst in plan]) \
            if plan else None
        with torch.inference_mode():
            runner.model(input_ids, positions, runner.kv_cache, AttentionMetadata(**fields, after_layer=push))
        if push is not None:
            group.push_reports(push.settle())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve-engine-rank")
    ap.add_argument("--spec-json", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--store", required=True, help="HOST:PORT of rank 0's TCPStore")
    args = ap.parse_args(argv)
    spec = WorkerSpec.from_json(args.spec_json)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s engine[{spec.instance_id}] rank {args.rank} %(levelname)s %(message)s")
    cpu_priority.as_compute_thread()   # it was forked from rank 0's main thread, which runs at SCHED_BATCH
    from pdserve.engine.model_runner import ModelRunner   # after logging: it logs while it loads

    host, port = args.store.rsplit(":", 1)
    device = spec.devices[args.rank]
    group = RankGroup(args.rank, len(spec.devices), parse_device(device).kind,
                      store_for(args.rank, len(spec.devices), host, int(port)))
    runner = ModelRunner(dataclasses.replace(spec.engine, device=device), group)
    log.info("rank %d of %d on %s: %d KV heads in its pool", args.rank, group.size, device, runner.kv_cache.shape[-2])
    transport = make_transport(spec.kv_transport, spec.host)
    if transport is not None:   # as rank 0 does in LLMEngine, in the same order of collectives
        share_pool(transport, runner, group)
    follow(runner, group, transport)
    return 0


if __name__ == "__main__":
    sys.exit(main())

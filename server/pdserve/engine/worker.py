"""An engine worker process: one model instance on its device, served over the engine RPC.

    python -m pdserve.engine.worker --spec-json '{...}' --ready-file PATH

The model runs in a dedicated thread (the engine loop); the asyncio gRPC server hands it
requests and aborts through a queue and streams each request's outputs back. When the
worker is ready it writes its address to the ready file (or the error that stopped it) and
registers in etcd under its own lease (cluster/registry.py).

PD handoff, DECODE side: a request with a prefill_address reserves its blocks at admission;
the asyncio side then calls that engine's Prefill with the block ids and waits for the first
token, which goes to the client at once, and the sequence joins the decode steps.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import queue
import signal
import sys
import threading
import time

import grpc

from pdserve._proto import engine_pb2, engine_pb2_grpc
from pdserve.common.etcd import EtcdClient
from pdserve.common.records import DEFAULT_TTL_S, STANDBY, EngineRecord
from pdserve.engine.registration import EngineRegistration
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_transport import make_transport
from pdserve.engine.llm_engine import LLMEngine, RequestError, RequestOutput
from pdserve.engine.sequence import SamplingParams

log = logging.getLogger("pdserve.engine")

KV_HANDOFF_TIMEOUT_S = float(os.environ.get("PDSERVE_KV_HANDOFF_TIMEOUT", "60"))
HANDOFF_GRACE_S = 10.0  # past the deadline, how long to wait for the prefill engine's answer


class KVHandoffError(RuntimeError):
    """The prompt's KV did not arrive: the request ends with an error, never with other KV."""


class EngineLoop:
    """Runs LLMEngine.step() in its own thread; the asyncio side talks to it through queues."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, asyncio.Queue] = {}
        self.prefill_addresses: dict[str, str] = {}
        self.peers: dict[str, engine_pb2_grpc.EngineStub] = {}
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, request_id: str, prompt: str, params: SamplingParams, prefill_address: str = "") -> asyncio.Queue:
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = stream
        if prefill_address:
            self.prefill_addresses[request_id] = prefill_address
        self.inbox.put(("add", request_id, prompt, params, bool(prefill_address)))
        return stream

    def submit_prefill(self, request: engine_pb2.PrefillRequest) -> asyncio.Queue:
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request.request_id] = stream
        self.inbox.put(("prefill", request))
        return stream

    # ---- DECODE side of the handoff (asyncio) ----------------------------------------------
    def _dispatch_prefills(self, seqs: list[tuple]) -> None:
        for item in seqs:
            asyncio.ensure_future(self._remote_prefill(*item))

    async def _remote_prefill(self, request_id: str, token_ids: list[int], params: SamplingParams,
                              block_ids: list[int]) -> None:
        address = self.prefill_addresses.pop(request_id, "")
        stub = self.peers.get(address)
        if stub is None:
            stub = self.peers[address] = engine_pb2_grpc.EngineStub(grpc.aio.insecure_channel(address))
        handshake = self.engine.transport.handshake()
        deadline = time.time() + KV_HANDOFF_TIMEOUT_S
        request = engine_pb2.PrefillRequest(
            request_id=request_id, token_ids=token_ids, sampling=from_sampling_params(params), deadline=deadline,
            destination=engine_pb2.KVDestination(
                transport=handshake["transport"], protocol=handshake["protocol"], session=handshake["session"],
                base_address=handshake["base_address"], block_bytes=handshake["block_bytes"], block_ids=block_ids))
        # No client-side deadline: the prefill engine enforces `deadline` itself, and until it
        # answers (or dies) it may be writing into our blocks, so they stay reserved till then.
        call = asyncio.ensure_future(stub.Prefill(request))
        try:
            response = await asyncio.wait_for(asyncio.shield(call), KV_HANDOFF_TIMEOUT_S + HANDOFF_GRACE_S)
            self.inbox.put(("kv_ready", request_id, response.first_token))
        except asyncio.TimeoutError:
            self.inbox.put(("kv_failed", request_id, f"prefill engine {address} did not answer within "
                            f"{KV_HANDOFF_TIMEOUT_S + HANDOFF_GRACE_S:.0f} s", call))
        except grpc.aio.AioRpcError as exc:
            self.inbox.put(("kv_failed", request_id, f"prefill engine {address}: {exc.code().name}: {exc.details()}", None))

    def abort(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        self.inbox.put(("abort", request_id))

    def _deliver(self, request_id: str, item) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)
            if isinstance(item, Exception) or getattr(item, "finish_reason", None):
                self.streams.pop(request_id, None)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)

    def _handle(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params, remote = command
            try:
                self.engine.add_request(request_id, prompt, params, remote_prefill=remote)
            except RequestError as exc:
                self.loop.call_soon_threadsafe(self._deliver, request_id, exc)
        elif kind == "prefill":
            request = command[1]
            try:
                self.engine.add_prefill_request(
                    request.request_id, list(request.token_ids), to_sampling_params(request.sampling),
                    destination={"transport": request.destination.transport, "session": request.destination.session,
                                 "base_address": request.destination.base_address,
                                 "block_bytes": request.destination.block_bytes,
                                 "block_ids": list(request.destination.block_ids)},
                    deadline=request.deadline)
            except RequestError as exc:
                self.loop.call_soon_threadsafe(self._deliver, request.request_id, exc)
        elif kind == "abort":
            self.engine.abort(command[1])
        elif kind == "kv_ready":
            out = self.engine.complete_remote_prefill(command[1], command[2])
            if out is not None:
                self.loop.call_soon_threadsafe(self._deliver, out.request_id, out)
        elif kind == "kv_failed":
            _, request_id, message, pending_call = command
            self.loop.call_soon_threadsafe(self._deliver, request_id, KVHandoffError(f"KV handoff failed: {message}"))
            if pending_call is None:
                self.engine.fail_remote_prefill(request_id)
            else:  # the prefill engine may still write: release the blocks when it has answered
                self.engine.abort(request_id)
                pending_call.add_done_callback(lambda _: self.inbox.put(("kv_release", request_id)))
        elif kind == "kv_release":
            self.engine.fail_remote_prefill(command[1])

    def _run(self) -> None:
        stalled = False
        while not self.stopped:
            try:
                # Block on the inbox when there is nothing to compute, and briefly when the queue
                # waits for blocks that only a handoff in flight will give back.
                if not self.engine.has_work():
                    command = self.inbox.get()
                else:
                    command = self.inbox.get(timeout=0.02) if stalled else self.inbox.get_nowait()
                self._handle(command)
                while True:
                    self._handle(self.inbox.get_nowait())
            except queue.Empty:
                pass
            if self.stopped or not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step must not leave streams hanging
                log.exception("engine step failed")
                for request_id in list(self.engine.sequences):
                    self.engine.abort(request_id)
                    self.loop.call_soon_threadsafe(self._deliver, request_id, RuntimeError(f"engine step failed: {exc}"))
                continue
            if outputs:  # one wake-up of the asyncio loop per step, not one per request
                self.loop.call_soon_threadsafe(self._deliver_all, outputs)
            dispatched = self._dispatch_reserved()  # always: a step can both decode and reserve
            stalled = not outputs and not dispatched

    def _dispatch_reserved(self) -> bool:
        reserved = [(s.request_id, list(s.prompt_token_ids), s.params, list(s.block_table))
                    for s in self.engine.take_reserved()]
        if reserved:
            self.loop.call_soon_threadsafe(self._dispatch_prefills, reserved)
        return bool(reserved)

    def stop(self) -> None:
        self.stopped = True
        self.inbox.put(("stop",))


def from_sampling_params(p: SamplingParams) -> engine_pb2.SamplingParams:
    return engine_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        has_seed=p.seed is not None, seed=p.seed or 0, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos, min_tokens=p.min_tokens)


def to_sampling_params(msg: engine_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p or 1.0, top_k=msg.top_k,
        seed=msg.seed if msg.has_seed else None, stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos, min_tokens=msg.min_tokens)


class EngineService(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine_loop: EngineLoop, identity: dict, registration: EngineRegistration | None):
        self.engine_loop = engine_loop
        self.engine = engine_loop.engine
        self.identity = identity
        self.registration = registration
        self.state = STANDBY

    async def Generate(self, request, context):
        if request.prefill_address and self.engine.transport is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this engine has no KV transport and cannot take KV from a prefill engine")
        stream = self.engine_loop.submit(request.request_id, request.prompt, to_sampling_params(request.sampling),
                                         request.prefill_address)
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, RequestError):
                    finished = True
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                if isinstance(item, KVHandoffError):
                    finished = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                if isinstance(item, Exception):
                    finished = True
                    await context.abort(grpc.StatusCode.INTERNAL, str(item))
                out: RequestOutput = item
                finished = out.finish_reason is not None
                yield engine_pb2.GenerateResponse(
                    text=out.text, token_ids=out.token_ids, num_input_tokens=out.num_input_tokens,
                    num_output_tokens=out.num_output_tokens, finish_reason=out.finish_reason or "",
                    first_token_time=out.first_token_time)
                if finished:
                    return
        finally:
            if not finished:  # the caller went away (cancel, deadline): free the request's blocks
                self.engine_loop.abort(request.request_id)

    async def Prefill(self, request, context):
        stream = self.engine_loop.submit_prefill(request)
        answered = False
        try:
            item = await stream.get()
            answered = True
        finally:
            if not answered:  # the decode engine went away: do not compute for nobody
                self.engine_loop.abort(request.request_id)
        if isinstance(item, RequestError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
        if isinstance(item, Exception):
            await context.abort(grpc.StatusCode.INTERNAL, str(item))
        if item.error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, item.error)
        return engine_pb2.PrefillResponse(first_token=item.token_ids[0], num_prompt_tokens=item.num_input_tokens,
                                          transfer_seconds=item.transfer_seconds, transfer_bytes=item.transfer_bytes)

    async def SetState(self, request, context):
        self.state = request.state
        if self.registration is not None:
            await self.registration.set_state(request.state)
        return engine_pb2.SetStateResponse()

    async def Stats(self, request, context):
        e = self.engine
        t = e.transfers
        return engine_pb2.StatsResponse(
            num_awaiting_kv=len(e.scheduler.awaiting_kv), kv_transfers=t.count, kv_transfer_failures=t.failures,
            kv_transfer_seconds=t.seconds, kv_transfer_bytes=t.bytes, kv_transfer_bucket_counts=t.buckets,
            state=self.state, incarnation=self.registration.record.incarnation if self.registration else "",
            lease_keepalive_failures=self.registration.keepalive_failures if self.registration else 0,
            instance_id=self.identity["instance_id"], model=self.identity["model"], version=self.identity["version"],
            role=self.identity["role"], device=e.cfg.device,
            num_running=len(e.scheduler.running), num_waiting=len(e.scheduler.waiting),
            num_free_blocks=e.block_manager.num_free_blocks, num_total_blocks=e.block_manager.num_blocks,
            num_preemptions=e.scheduler.num_preemptions, prompt_tokens_total=e.prompt_tokens_total,
            generation_tokens_total=e.generation_tokens_total,
            waiting_prefill_tokens=e.scheduler.waiting_prefill_tokens, max_model_len=e.max_model_len)


def write_ready_file(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def die_with_parent() -> None:
    """Linux: get SIGTERM when the front end that started us dies, even by kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


async def serve(spec: dict, ready_file: str) -> None:
    cfg = EngineConfig(**spec["engine"])
    transport_kind = spec.get("kv_transport") or ("mooncake" if spec["role"] in ("PREFILL", "DECODE") else "none")
    transport = make_transport(transport_kind, spec["host"])
    engine = LLMEngine(cfg, transport)
    loop = asyncio.get_running_loop()
    engine_loop = EngineLoop(engine, loop)
    engine_loop.start()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port(f"{spec['host']}:0")
    address = f"{spec['host']}:{port}"
    registration = None
    if spec.get("etcd_endpoints"):
        record = EngineRecord(
            instance_id=spec["instance_id"], model=spec["model"], version=spec["version"], role=spec["role"],
            device=cfg.device, node=spec.get("node", ""), address=address, pid=os.getpid(),
            kv_transport=transport.handshake() if transport else {},
            capacity={"num_blocks": engine.block_manager.num_blocks, "block_size": engine.block_manager.block_size,
                      "max_model_len": engine.max_model_len, "max_num_seqs": cfg.max_num_seqs})
        registration = EngineRegistration(EtcdClient(spec["etcd_endpoints"]), spec.get("cluster", "default"), record,
                                          ttl=int(spec.get("lease_ttl", DEFAULT_TTL_S)))
    engine_pb2_grpc.add_EngineServicer_to_server(EngineService(engine_loop, spec, registration), server)
    await server.start()
    if registration is not None:
        await registration.start()
    log.info("engine %s (%s %s) serving on %s", spec["instance_id"], spec["model"], spec["role"], address)
    write_ready_file(ready_file, {"address": address, "pid": os.getpid(), "max_model_len": engine.max_model_len,
                                  "num_blocks": engine.block_manager.num_blocks, "ready_time": time.time()})
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if registration is not None:
        await registration.stop()  # graceful: the record goes at once
    await server.stop(grace=2)
    engine_loop.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve-engine")
    ap.add_argument("--spec-json", required=True, help="instance spec: identity, host and engine settings")
    ap.add_argument("--ready-file", required=True)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec_json)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s engine[{spec['instance_id']}] %(levelname)s %(message)s")
    die_with_parent()
    try:
        asyncio.run(serve(spec, args.ready_file))
    except Exception as exc:
        log.exception("engine failed")
        write_ready_file(args.ready_file, {"error": f"{type(exc).__name__}: {exc}"})
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An engine worker process: one model instance on its device, served over the engine RPC.

    python -m pdserve.engine.worker --spec-json '{...}' --ready-fd N   (engine/spec.py)

Threads: the engine thread (EngineLoop) owns the engine and runs its steps; the asyncio thread
serves the engine RPC (prompts arrive as token ids: front ends tokenize, the engine only
detokenizes), carries PD handoff RPCs (PrefillPeers) and reads the engine's stats snapshot.
They meet only at the engine's inbox (typed commands, engine/commands.py) and the per-request
output queues. The engine thread (and its OpenMP team) runs at normal priority, every other
thread at SCHED_BATCH, so handing outputs on never preempts a step (common/cpu_priority.py).

PD handoff, DECODE side: a request with a prefill_address reserves its blocks at admission;
the asyncio side then calls that engine's Prefill with the block ids, and its answer goes back
to the engine thread, where the KV connector decides (engine/kv_connector.py).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict

import grpc

from pdserve._proto import engine_pb2, engine_pb2_grpc
from pdserve.common import cpu_priority
from pdserve.common.cluster_auth import TokenInterceptor, call_metadata, read_token
from pdserve.common.constants import GRPC_MESSAGE_OPTIONS
from pdserve.common.errors import Cause, ServeError, cause_of, channel_closed_under_call, trailing_cause
from pdserve.common.etcd import EtcdClient
from pdserve.common.devices import parse_device
from pdserve.common.process import die_with_parent
from pdserve.common.records import EngineRecord
from pdserve.engine.commands import Abort, AddPrefill, AddRequest, Command, CommandType, PrefillAnswer, Stop
from pdserve.engine.kv_connector import DEFAULT_GRACE_S, Handoff
from pdserve.engine.kv_transport import KVDestination, KVPool, make_transport
from pdserve.engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from pdserve.engine import ranks
from pdserve.engine.registration import EngineRegistration
from pdserve.engine.sequence import SamplingParams, Sequence
from pdserve.engine.spec import ReadyPipe, WorkerSpec

log = logging.getLogger("pdserve.engine")

KV_HANDOFF_TIMEOUT_S = float(os.environ.get("PDSERVE_KV_HANDOFF_TIMEOUT", "60"))
IDLE_POLL_S = 0.1      # how often an idle engine with open handoffs checks their deadlines
STALLED_POLL_S = 0.02  # how long a step that could do nothing waits for a command
# An idle engine gathers a burst for at most this many admission_window_ms in all (a steady
# trickle of requests, or announced ones that went to another engine, must not hold the first
# one back for long), and the window it waits between requests is at most this fraction of its
# recent decode step, so a lone request's wait stays small beside its first step on a fast device.
ADMISSION_WINDOWS_MAX = 10
ADMISSION_STEP_FRACTION = 0.5


class EngineLoop:
    """Runs the engine in its own thread; the asyncio side talks to it through the inbox."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop, on_dispatch):
        self.engine = engine
        self.loop = loop
        self.on_dispatch = on_dispatch    # asyncio side: send these handoffs to their prefill engines
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, asyncio.Queue] = {}
        self.stats: EngineStats = engine.stats()   # replaced whole by the engine thread, never edited
        # When the engine thread last showed progress: the end of its last loop, or the moment work
        # reached an engine that had none (an idle engine owes no progress, so its wait in the
        # inbox must not count against the step that follows: see seconds_since_progress).
        self.heartbeat = time.monotonic()
        self.max_admission_window_s = engine.cfg.admission_window_ms / 1000
        self.step_seconds = 0.0                    # EWMA of steps that decoded: the time per output token
        self.prefill_tokens_per_s = 0.0            # EWMA of steps that computed prompt tokens
        self.heartbeat_s: float | None = None      # tensor parallelism: the longest an idle engine may wait
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.handlers = {
            CommandType.ADD: lambda c: engine.add_request(c.request_id, list(c.token_ids), c.params, c.prefill_address,
                                                          list(c.resume_token_ids), c.prompt_block_hashes),
            CommandType.ADD_PREFILL: lambda c: engine.add_prefill_request(
                c.request_id, list(c.token_ids), c.params, c.destination, c.deadline),
            CommandType.ABORT: lambda c: engine.abort(c.request_id),
            CommandType.PREFILL_ANSWER: lambda c: engine.on_prefill_answer(c.request_id, c.first_token, c.cause, c.message),
            CommandType.STOP: lambda c: None,
        }

    def start(self) -> None:
        self.thread.start()

    # ---- asyncio side --------------------------------------------------------------------
    def open(self, command: AddRequest | AddPrefill, sink: asyncio.Queue | None = None) -> asyncio.Queue:
        """Queues a request; its outputs (RequestOutput, the last one final) arrive on the
        queue: `sink`, which several requests may share, or a new one."""
        stream: asyncio.Queue = asyncio.Queue() if sink is None else sink
        self.streams[command.request_id] = stream
        self.inbox.put(command)
        return stream

    def send(self, command: Command) -> None:
        if isinstance(command, Abort):
            self.streams.pop(command.request_id, None)
        self.inbox.put(command)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
                if out.final:
                    self.streams.pop(out.request_id, None)

    # ---- engine thread -----------------------------------------------------------------------
    def _handle(self, command: Command) -> list[RequestOutput]:
        try:
            return self.handlers[command.type](command) or []
        except ServeError as exc:
            return [RequestOutput(command.request_id, error=exc)]

    def _next_command(self, stalled: bool) -> Command | None:
        try:
            if self.engine.has_work():
                return self.inbox.get(timeout=STALLED_POLL_S) if stalled else self.inbox.get_nowait()
            if self.engine.num_open_handoffs:
                return self.inbox.get(timeout=IDLE_POLL_S)
            return self.inbox.get(timeout=self.heartbeat_s)
        except queue.Empty:
            return None

    def _following_command(self, gather_until: float | None, announced: int = 0) -> Command | None:
        """The next queued command. An idle engine that just got a request (gather_until set)
        waits for the rest of a burst: while requests keep coming within an admission window of
        each other, or while the last one announced more (its front end was still admitting
        them), until its first step is full or gather_until. The step takes only the prompts
        that have arrived, and its compute would hold the rest (and the front end and asyncio
        thread forwarding them, which run at lower priority) until it ends."""
        try:
            left = 0.0 if gather_until is None else gather_until - time.monotonic()
            if left <= 0 or self.stopped or self.engine.next_step_is_full():
                return self.inbox.get_nowait()
            return self.inbox.get(timeout=left if announced else min(self.admission_window(), left))
        except queue.Empty:
            return None

    def admission_window(self) -> float:
        """Seconds an idle engine waits for a burst's next request: admission_window_ms, or
        half its recent decode step when that is shorter."""
        if not self.step_seconds:
            return self.max_admission_window_s
        return min(self.max_admission_window_s, ADMISSION_STEP_FRACTION * self.step_seconds)

    def _run(self) -> None:
        cpu_priority.as_compute_thread()   # before its first op: its OpenMP team inherits normal priority
        stalled = False
        while not self.stopped:
            self.heartbeat_s = self.engine.keep_ranks_alive()
            outputs: list[RequestOutput] = []
            idle = not self.engine.has_work()
            command = self._next_command(stalled)
            gather_until = None
            if idle:   # it may have waited here for minutes: progress is owed from now on
                self.heartbeat = time.monotonic()
                if isinstance(command, (AddRequest, AddPrefill)):
                    gather_until = self.heartbeat + ADMISSION_WINDOWS_MAX * self.max_admission_window_s
            announced = 0   # requests the last one said its front end was still admitting
            while command is not None:
                outputs += self._handle(command)
                if isinstance(command, AddRequest):
                    announced = command.admitting
                command = self._following_command(gather_until, announced)
            outputs += self.engine.expire_handoffs()
            self.stats = self.engine.stats()   # what the step is about to do shows while it runs
            stepped = False
            if not self.stopped and self.engine.has_work():
                try:
                    started = time.monotonic()
                    step_outputs = self.engine.step()
                    took = time.monotonic() - started
                    if self.stats.num_running:
                        self.step_seconds = took if not self.step_seconds else 0.8 * self.step_seconds + 0.2 * took
                    if self.engine.prefilled_tokens and took > 0:
                        speed = self.engine.prefilled_tokens / took
                        self.prefill_tokens_per_s = (0.8 * self.prefill_tokens_per_s + 0.2 * speed
                                                     if self.prefill_tokens_per_s else speed)
                except Exception as exc:  # a failed step must not leave streams hanging
                    log.exception("engine step failed")
                    step_outputs = self.engine.fail_all(ServeError(Cause.ENGINE_FAILURE, f"engine step failed: {exc}"))
                outputs += step_outputs
                stepped = bool(step_outputs)
            dispatch = self.engine.take_dispatch()  # always: a step can both decode and reserve
            if dispatch:
                handshake = self.engine.transport.handshake()
                self.loop.call_soon_threadsafe(self.on_dispatch, [prefill_call(h, s, handshake, self.engine.kv_pools)
                                                                  for h, s in dispatch])
            if outputs:  # one wake-up of the asyncio loop per step, not one per request
                self.loop.call_soon_threadsafe(self._deliver, outputs)
            self.stats = self.engine.stats()
            self.heartbeat = time.monotonic()
            stalled = not stepped and not dispatch

    def seconds_since_progress(self) -> float:
        """How long the engine has held requests without finishing a loop or, within a step, a
        layer (0 when it holds none): the supervisor takes an engine past its stall limit for
        frozen. The layers count so that one long prompt's step is not taken for a stall."""
        s = self.stats
        if not s.num_running + s.num_waiting:
            return 0.0
        return time.monotonic() - max(self.heartbeat, self.engine.runner.progress.at)

    def stop(self) -> None:
        self.stopped = True
        self.inbox.put(Stop())


def prefill_call(handoff: Handoff, seq: Sequence, handshake: dict,
                 pools: tuple[KVPool, ...] = ()) -> tuple[str, engine_pb2.PrefillRequest]:
    """The Prefill RPC of one handoff, and the prefill engine to send it to; pools: every rank's
    of a tensor-parallel instance."""
    return handoff.prefill_address, engine_pb2.PrefillRequest(
        request_id=handoff.request_id, token_ids=seq.prompt_token_ids, sampling=seq.params.to_proto(),
        deadline=handoff.deadline, destination=engine_pb2.KVDestination(
            transport=handshake["transport"], protocol=handshake["protocol"], session=handshake["session"],
            base_address=handshake["base_address"], block_bytes=handshake["block_bytes"], block_ids=handoff.block_ids,
            held_blocks=handoff.held_blocks, layer_stride=handshake["layer_stride"],
            rank_pools=[engine_pb2.KVRankPool(session=p.session, base_address=p.base_address, block_bytes=p.block_bytes,
                                              layer_stride=p.layer_stride, first_kv_head=p.kv_heads[0],
                                              num_kv_heads=p.kv_heads[1] - p.kv_heads[0]) for p in pools]))


class PrefillPeers:
    """DECODE side, asyncio: calls the prefill engines and reports each answer to the engine.

    One channel per prefill engine; a channel whose peer proved unreachable is closed, so
    restarted engines (new addresses) never leave channels behind."""

    def __init__(self, engine_loop: EngineLoop, token: str = "", grace_s: float = DEFAULT_GRACE_S):
        self.engine_loop = engine_loop
        self.metadata = call_metadata(token)
        self.grace_s = grace_s
        self.channels: dict[str, grpc.aio.Channel] = {}

    def dispatch(self, calls: list[tuple[str, engine_pb2.PrefillRequest]]) -> None:
        for address, request in calls:
            asyncio.ensure_future(self._call(address, request))

    async def _call(self, address: str, request: engine_pb2.PrefillRequest) -> None:
        channel = self.channels.get(address)
        if channel is None:
            channel = self.channels[address] = grpc.aio.insecure_channel(address, options=GRPC_MESSAGE_OPTIONS)
        # The call's own deadline bounds the wait; until the answer, the prefill engine may be
        # writing into our blocks, and the connector keeps them reserved till then.
        timeout = max(request.deadline - time.time(), 0) + 2 * self.grace_s
        try:
            response = await engine_pb2_grpc.EngineStub(channel).Prefill(request, timeout=timeout,
                                                                         metadata=self.metadata)
            answer = PrefillAnswer(request.request_id, response.first_token)
        except grpc.aio.AioRpcError as exc:
            cause = cause_of(exc, Cause.KV_HANDOFF_TIMEOUT if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                             else Cause.KV_HANDOFF_PEER_LOST)
            answer = PrefillAnswer(request.request_id, None, cause, f"{exc.code().name}: {exc.details()}")
            if exc.code() == grpc.StatusCode.UNAVAILABLE and self.channels.get(address) is channel:
                del self.channels[address]
                await channel.close()
        except asyncio.CancelledError:
            if not channel_closed_under_call():
                raise   # this engine is stopping
            # the answer still goes to the engine, or the request waits for the handoff deadline
            answer = PrefillAnswer(request.request_id, None, Cause.KV_HANDOFF_PEER_LOST,
                                   "UNAVAILABLE: the prefill engine went away")
        self.engine_loop.send(answer)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()


def stream_output(out: RequestOutput) -> engine_pb2.StreamOutput:
    if out.error is not None:
        return engine_pb2.StreamOutput(request_id=out.request_id, cause=out.error.cause.name,
                                       message=out.error.message)
    return engine_pb2.StreamOutput(request_id=out.request_id, response=engine_pb2.GenerateResponse(
        text=out.text, token_ids=out.token_ids, num_input_tokens=out.num_input_tokens,
        num_output_tokens=out.num_output_tokens, finish_reason=out.finish_reason or "",
        logprobs=[lp.to_proto() for lp in out.logprobs], prompt_logprobs=[lp.to_proto() for lp in out.prompt_logprobs]))


async def abort_with(context, error: ServeError) -> None:
    await context.abort(error.cause.status, error.message, trailing_metadata=trailing_cause(error.cause))


class EngineService(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine_loop: EngineLoop, registration: EngineRegistration | None):
        self.engine_loop = engine_loop
        self.block_size = engine_loop.engine.block_manager.block_size
        self.registration = registration

    async def GenerateStream(self, commands, context):
        """A front end's requests to this engine, multiplexed (protos/engine.proto): one message
        per engine step carries every output of the step for this stream's requests."""
        outputs: asyncio.Queue = asyncio.Queue()   # RequestOutputs of this stream's requests
        open_ids: set[str] = set()                 # started here, not final yet
        reader = asyncio.ensure_future(self._read_commands(commands, outputs, open_ids))
        try:
            while True:
                batch = [await outputs.get()]
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                message = engine_pb2.StreamOutputs()
                for out in batch:
                    if out is None:   # the front end closed its side: its open requests end
                        return
                    if out.request_id not in open_ids:   # aborted meanwhile
                        continue
                    if out.final:
                        open_ids.discard(out.request_id)
                    message.outputs.append(stream_output(out))
                if message.outputs:
                    yield message
        finally:
            reader.cancel()
            for request_id in open_ids:   # the caller went away: free the requests' blocks
                self.engine_loop.send(Abort(request_id))
            open_ids.clear()

    async def _read_commands(self, commands, outputs: asyncio.Queue, open_ids: set[str]) -> None:
        try:
            async for command in commands:
                if command.HasField("generate"):
                    open_ids.add(command.generate.request_id)
                    self._start(command.generate, outputs, open_ids)
                else:
                    open_ids.discard(command.abort)
                    self.engine_loop.send(Abort(command.abort))
        finally:
            outputs.put_nowait(None)

    def _start(self, request: engine_pb2.GenerateRequest, outputs: asyncio.Queue, open_ids: set[str]) -> None:
        """Queues the request; the front end tokenized its prompt (and may have hashed its blocks)."""
        hashes = tuple(request.prompt_block_hashes) if request.block_size == self.block_size else ()
        command = AddRequest(request.request_id, tuple(request.prompt_token_ids),
                             SamplingParams.from_proto(request.sampling), request.prefill_address,
                             tuple(request.resume_token_ids), hashes, request.admitting)
        if command.params.structured_kind:
            asyncio.ensure_future(self._compile_then_open(command, outputs, open_ids))
        else:
            self.engine_loop.open(command, sink=outputs)

    async def _compile_then_open(self, command: AddRequest, outputs: asyncio.Queue, open_ids: set[str]) -> None:
        """A constrained request's grammar is compiled here, off the engine thread (the engine then
        finds it in the compiler's cache); one it cannot compile ends the request with INVALID_ARGUMENT."""
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self.engine_loop.engine.structured.check, command.params)
        except ServeError as exc:
            outputs.put_nowait(RequestOutput(command.request_id, error=exc))
            return
        if command.request_id in open_ids:   # not aborted meanwhile
            self.engine_loop.open(command, sink=outputs)

    async def Prefill(self, request, context):
        d = request.destination
        stream = self.engine_loop.open(AddPrefill(
            request.request_id, tuple(request.token_ids), SamplingParams.from_proto(request.sampling),
            KVDestination(d.transport, d.protocol, d.session, d.base_address, d.block_bytes, tuple(d.block_ids),
                          d.held_blocks, d.layer_stride,
                          tuple(KVPool(p.session, p.base_address, p.block_bytes, p.layer_stride,
                                       (p.first_kv_head, p.first_kv_head + p.num_kv_heads)) for p in d.rank_pools)),
            request.deadline))
        answered = False
        try:
            out: RequestOutput = await stream.get()
            answered = True
        finally:
            if not answered:  # the decode engine went away: do not compute for nobody
                self.engine_loop.send(Abort(request.request_id))
        if out.error is not None:
            await abort_with(context, out.error)
        return engine_pb2.PrefillResponse(first_token=out.token_ids[0])

    async def SetState(self, request, context):
        if request.role:
            log.info("role %s, state %s", request.role, request.state)
        if self.registration is not None:
            await self.registration.set_state(request.state, request.role)
        return engine_pb2.SetStateResponse()

    async def Stats(self, request, context):
        s = self.engine_loop.stats
        events = self.engine_loop.engine.kv_events.since(request.kv_events_after)
        store = self.engine_loop.engine.kv_tiers.tier("store") if self.engine_loop.engine.kv_tiers else None
        stored = store.events.since(request.store_events_after) if store is not None else None
        return engine_pb2.StatsResponse(
            num_running=s.num_running, num_waiting=s.num_waiting, num_awaiting_kv=s.num_awaiting_kv,
            num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks, num_preemptions=s.num_preemptions,
            waiting_prefill_tokens=s.waiting_prefill_tokens, kv_transfers=s.kv_transfers,
            kv_transfer_failures=s.kv_transfer_failures, kv_transfer_seconds=s.kv_transfer_seconds,
            kv_transfer_bytes=s.kv_transfer_bytes, kv_transfer_bucket_counts=s.kv_transfer_bucket_counts,
            lease_keepalive_failures=self.registration.keepalive_failures if self.registration else 0,
            seconds_since_progress=self.engine_loop.seconds_since_progress(),
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
            num_cached_blocks=s.num_cached_blocks, kv_event_id=events.event_id, kv_events_reset=events.reset,
            stored_block_hashes=events.stored, removed_block_hashes=events.removed,
            num_open_requests=len(self.engine_loop.streams), step_seconds=self.engine_loop.step_seconds,
            # read now, not at the last step: the disk and store tiers' writer threads go on between steps
            kv_tiers=[engine_pb2.StatsResponse.KVTier(**asdict(t)) for t in self.engine_loop.engine.tier_stats()],
            prefill_tokens_per_second=self.engine_loop.prefill_tokens_per_s,
            **({"store_event_id": stored.event_id, "store_events_reset": stored.reset,
                "store_stored_hashes": stored.stored, "store_removed_hashes": stored.removed} if stored else {}))


async def serve(spec: WorkerSpec, ready: ReadyPipe) -> None:
    followers, group = [], None
    if len(spec.devices) > 1:   # tensor parallelism: this is rank 0; the others start before it pins itself
        store = ranks.store_for(0, len(spec.devices), spec.host)
        followers = ranks.start_followers(spec, store)
        ranks.watch_followers(followers, lambda: group)
    log.info("threads beside the engine thread: %s", cpu_priority.lower_engine_worker())
    cfg = spec.engine
    token = read_token(spec.cluster_token_file) if spec.cluster_token_file else ""
    transport = make_transport(spec.kv_transport, spec.host)
    if followers:
        group = ranks.RankGroup(0, len(spec.devices), parse_device(cfg.device).kind, store)
        log.info("tensor parallelism: %d ranks on %s", group.size, ", ".join(spec.devices))
    engine = LLMEngine(cfg, transport, handoff_timeout_s=KV_HANDOFF_TIMEOUT_S, tp=group)
    loop = asyncio.get_running_loop()
    engine_loop = EngineLoop(engine, loop, on_dispatch=lambda calls: peers.dispatch(calls))
    peers = PrefillPeers(engine_loop, token)
    engine_loop.start()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *GRPC_MESSAGE_OPTIONS],
                             interceptors=[TokenInterceptor(token)] if token else [])
    port = server.add_insecure_port(f"{spec.host}:0")
    address = f"{spec.host}:{port}"
    registration = None
    if spec.etcd_endpoints:
        record = EngineRecord(
            instance_id=spec.instance_id, model=spec.model, version=spec.version, role=spec.role,
            device=cfg.device, node=spec.node, address=address, pid=os.getpid(),
            capacity={"num_blocks": engine.block_manager.num_blocks, "block_size": engine.block_manager.block_size,
                      "max_model_len": engine.max_model_len, "max_num_seqs": cfg.max_num_seqs,
                      "tensor_parallel_size": max(1, len(spec.devices)),
                      "kv_head_ranges": [list(p.kv_heads) for p in engine.kv_pools]})
        etcd = EtcdClient(list(spec.etcd_endpoints), spec.etcd_security)
        registration = EngineRegistration(etcd, spec.cluster, record, ttl=spec.lease_ttl, token=token)
    engine_pb2_grpc.add_EngineServicer_to_server(EngineService(engine_loop, registration), server)
    await server.start()
    if registration is not None:
        await registration.start()
    log.info("engine %s (%s %s) serving on %s", spec.instance_id, spec.model, spec.role, address)
    ready.ready(address)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if registration is not None:
        await registration.stop()  # graceful: the record goes at once
    await server.stop(grace=2)     # requests in flight get 2 s, then end with an error
    engine_loop.stop()
    await asyncio.get_running_loop().run_in_executor(None, engine_loop.thread.join, 10)
    ranks.stop_followers(followers, group)
    await peers.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve-engine")
    ap.add_argument("--spec-json", required=True, help="the instance's WorkerSpec as JSON (engine/spec.py)")
    ap.add_argument("--ready-fd", type=int, required=True,
                    help="an inherited pipe end: one JSON line, the address once serving or the error")
    args = ap.parse_args(argv)
    ready = ReadyPipe(args.ready_fd)
    try:
        spec = WorkerSpec.from_json(args.spec_json)
    except ValueError as exc:   # pydantic's ValidationError: a supervisor of another pdserve version
        ready.failed(f"the worker spec does not fit this engine: {exc}")
        return 2
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s engine[{spec.instance_id}] %(levelname)s %(message)s")
    die_with_parent()
    try:
        asyncio.run(serve(spec, ready))
    except Exception as exc:
        log.exception("engine failed")
        ready.failed(f"{type(exc).__name__}: {exc}")
        return 3
    log.info("engine %s stopped", spec.instance_id)
    logging.shutdown()
    # Everything is stopped and flushed: skip interpreter teardown, where native libraries'
    # static destructors (the transfer engine's threads) would abort the process.
    os._exit(0)

if __name__ == "__main__":
    sys.exit(main())

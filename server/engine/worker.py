"""An engine worker process: one model instance on its device, served over the engine RPC.

    python -m pdserve.engine.worker --spec-json '{...}' --ready-file PATH

The model runs in a dedicated thread (the engine loop); the asyncio gRPC server hands it
requests and aborts through a queue and streams each request's outputs back. When the
worker is ready it writes its address to the ready file (or the error that stopped it).
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
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine, RequestError, RequestOutput
from pdserve.engine.sequence import SamplingParams

log = logging.getLogger("pdserve.engine")


class EngineLoop:
    """Runs LLMEngine.step() in its own thread; the asyncio side talks to it through queues."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, asyncio.Queue] = {}
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, request_id: str, prompt: str, params: SamplingParams) -> asyncio.Queue:
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = stream
        self.inbox.put(("add", request_id, prompt, params))
        return stream

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
        if command[0] == "add":
            _, request_id, prompt, params = command
            try:
                self.engine.add_request(request_id, prompt, params)
            except RequestError as exc:
                self.loop.call_soon_threadsafe(self._deliver, request_id, exc)
        elif command[0] == "abort":
            self.engine.abort(command[1])

    def _run(self) -> None:
        while not self.stopped:
            try:
                # Block on the inbox only when there is nothing to compute.
                idle = not self.engine.has_work()
                self._handle(self.inbox.get() if idle else self.inbox.get_nowait())
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

    def stop(self) -> None:
        self.stopped = True
        self.inbox.put(("stop",))


def to_sampling_params(msg: engine_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p or 1.0, top_k=msg.top_k,
        seed=msg.seed if msg.has_seed else None, stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos, min_tokens=msg.min_tokens)


class EngineService(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine_loop: EngineLoop, identity: dict):
        self.engine_loop = engine_loop
        self.engine = engine_loop.engine
        self.identity = identity

    async def Generate(self, request, context):
        stream = self.engine_loop.submit(request.request_id, request.prompt, to_sampling_params(request.sampling))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, RequestError):
                    finished = True
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
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

    async def Stats(self, request, context):
        e = self.engine
        return engine_pb2.StatsResponse(
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
    engine = LLMEngine(EngineConfig(**spec["engine"]))
    loop = asyncio.get_running_loop()
    engine_loop = EngineLoop(engine, loop)
    engine_loop.start()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    engine_pb2_grpc.add_EngineServicer_to_server(EngineService(engine_loop, spec), server)
    port = server.add_insecure_port(f"{spec['host']}:0")
    await server.start()
    address = f"{spec['host']}:{port}"
    log.info("engine %s (%s %s) serving on %s", spec["instance_id"], spec["model"], spec["role"], address)
    write_ready_file(ready_file, {"address": address, "pid": os.getpid(), "max_model_len": engine.max_model_len,
                                  "num_blocks": engine.block_manager.num_blocks, "ready_time": time.time()})
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
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

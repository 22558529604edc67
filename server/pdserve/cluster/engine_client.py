"""The front end's side of the engine RPC: channels to engines, local or on other nodes.

Transport only: each EngineClient opens its engine's channel, carries the requests on one
shared stream, and asks Stats and SetState. What the answers mean for routing (load, the KV
index, the stall watchdog's figures) is the load plane's (cluster/load.py): it watches every
Stats call of a client, whoever makes it, through the StatsWatcher given to EngineClients.
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Protocol

import grpc

from pdserve._proto import engine_pb2, engine_pb2_grpc
from pdserve.common.cluster_auth import call_metadata
from pdserve.common.constants import GRPC_MESSAGE_OPTIONS
from pdserve.common.errors import Cause, cause_named, cause_of


class StatsWatcher(Protocol):
    """Sees every Stats call of a node's clients (what to ask, what came back) and keeps
    which engines are unreachable lately (suspect)."""

    def stats_request(self, address: str) -> tuple[engine_pb2.StatsRequest, object]:
        """The request to send, and a ticket handed back with its answer."""

    def stats_answered(self, address: str, ticket: object, stats: engine_pb2.StatsResponse) -> None: ...

    def suspect(self, address: str) -> bool: ...

    def set_suspect(self, address: str, suspect: bool) -> None: ...


def merge_response(into: engine_pb2.GenerateResponse, later: engine_pb2.GenerateResponse) -> None:
    """Appends a later response of the same request to one not yet sent on."""
    into.text += later.text
    into.token_ids.extend(later.token_ids)
    into.logprobs.extend(later.logprobs)
    into.prompt_logprobs.extend(later.prompt_logprobs)
    into.num_input_tokens = later.num_input_tokens
    into.num_output_tokens = later.num_output_tokens
    into.finish_reason = later.finish_reason


def _response_of(item) -> engine_pb2.GenerateResponse | None:
    """A GenerateCall item's response; None for a failure (the engine's cause, or the stream's)."""
    return item.response if isinstance(item, engine_pb2.StreamOutput) and not item.cause else None


class EngineCallError(Exception):
    """One request's engine call ended badly: a gRPC status code, its details, and the cause
    the engine gave (None: it never answered: unreachable, died, its stream broke)."""

    def __init__(self, code: grpc.StatusCode, details: str, cause: Cause | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.cause = code, details, cause

    @property
    def engine_lost(self) -> bool:
        """Unreachable, died, or shutting down (an engine cancels its calls when it stops)."""
        return self.cause is None and self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class GenerateCall:
    """One request on an engine's shared stream: iterate it for GenerateResponses (the last one
    has a finish_reason); EngineCallError ends it badly; cancel() aborts it in the engine.

    Responses the caller has not taken yet are merged into one (text and token ids appended,
    counts and finish reason the newest), as vLLM v1's output collector does: a front end that
    falls behind its engine, or a door waiting on a slow client, then sends fewer and larger
    responses instead of building a backlog.

    `stream_interval` (vLLM's option of that name): after the first response, the caller is
    woken only when the merged response holds that many tokens, or ends the request. Each
    response costs the front end and the client about as much as a token costs the engine on a
    small CPU host, so an interval above 1 trades smoothness for throughput there."""

    def __init__(self, stream: "_Stream", request_id: str, deadline: float | None, stream_interval: int = 1):
        self._stream = stream
        self.request_id = request_id
        self._deadline = deadline          # time.monotonic(); None: unbounded
        self._interval = max(stream_interval, 1)
        self._items: collections.deque = collections.deque()   # StreamOutputs, then maybe an EngineCallError
        self._ready = asyncio.Event()
        self._woken = False                # the first response went out at once (time to first token)
        self.done = False

    def deliver(self, item: engine_pb2.StreamOutput | EngineCallError) -> None:
        """The stream's reader hands over an output of this request, or the stream's failure."""
        response = _response_of(item)
        held = _response_of(self._items[-1]) if self._items else None
        if response is not None and held is not None:
            merge_response(held, response)
            response = held
        else:
            self._items.append(item)
        if (not self._woken or response is None or response.finish_reason
                or len(response.token_ids) >= self._interval):
            self._woken = True
            self._ready.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> engine_pb2.GenerateResponse:
        if self.done:
            raise StopAsyncIteration
        while not self._ready.is_set():
            left = None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)
            try:
                await asyncio.wait_for(self._ready.wait(), left)
            except asyncio.TimeoutError:
                self.cancel()
                raise EngineCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed") from None
        item = self._items.popleft()
        if not self._items:
            self._ready.clear()
        if isinstance(item, EngineCallError):
            self.done = True
            raise item
        if item.cause:
            self._end()
            cause = cause_named(item.cause, Cause.INTERNAL)
            raise EngineCallError(cause.status, item.message, cause)
        if item.response.finish_reason:
            self._end()
        return item.response

    def _end(self) -> None:
        self.done = True
        self._stream.calls.pop(self.request_id, None)

    def cancel(self) -> None:
        """The caller went away or gave up: the engine aborts the request and frees its blocks."""
        if not self.done:
            self._end()
            self._stream.send(engine_pb2.StreamCommand(abort=self.request_id))


class _Stream:
    """One GenerateStream call to an engine and the requests on it."""

    def __init__(self, stub: engine_pb2_grpc.EngineStub, metadata):
        self.calls: dict[str, GenerateCall] = {}
        self._commands: asyncio.Queue = asyncio.Queue()
        self.failed = False
        self._call = stub.GenerateStream(self._command_iterator(), metadata=metadata)
        self._reader = asyncio.ensure_future(self._read())

    async def _command_iterator(self):
        while True:
            yield await self._commands.get()

    def send(self, command: engine_pb2.StreamCommand) -> None:
        if not self.failed:
            self._commands.put_nowait(command)

    def start(self, request: engine_pb2.GenerateRequest, deadline: float | None, stream_interval: int) -> GenerateCall:
        call = self.calls[request.request_id] = GenerateCall(self, request.request_id, deadline, stream_interval)
        self.send(engine_pb2.StreamCommand(generate=request))
        return call

    async def _read(self) -> None:
        failure = EngineCallError(grpc.StatusCode.UNAVAILABLE, "the engine ended its stream")
        try:
            async for message in self._call:
                for out in message.outputs:
                    call = self.calls.get(out.request_id)
                    if call is not None:
                        call.deliver(out)
        except grpc.aio.AioRpcError as exc:
            failure = EngineCallError(exc.code(), exc.details() or "", cause_of(exc, None))
        except asyncio.CancelledError:   # the channel was closed (the engine left), or close()
            failure = EngineCallError(grpc.StatusCode.UNAVAILABLE, "the engine went away")
        finally:
            self.failed = True   # the next request opens a new stream
            for call in self.calls.values():
                call.deliver(failure)
            self.calls.clear()

    def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()


class EngineClient:
    def __init__(self, address: str, token: str = "", watcher: StatsWatcher | None = None):
        self.address = address
        self.metadata = call_metadata(token)   # the cluster secret, on every call
        self._channel: grpc.aio.Channel | None = None   # opened on the first call
        self._stub: engine_pb2_grpc.EngineStub | None = None
        self._stream: _Stream | None = None    # every request of this front end to the engine
        self._watcher = watcher

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=GRPC_MESSAGE_OPTIONS)
        return self._channel

    @property
    def stub(self) -> engine_pb2_grpc.EngineStub:
        if self._stub is None:
            self._stub = engine_pb2_grpc.EngineStub(self.channel)
        return self._stub

    @property
    def suspect(self) -> bool:
        """Unreachable lately (a call failed to connect, or Stats failed): routed around until
        a Stats call answers again. The watcher keeps it; without one, never."""
        return self._watcher is not None and self._watcher.suspect(self.address)

    @suspect.setter
    def suspect(self, value: bool) -> None:
        if self._watcher is not None:
            self._watcher.set_suspect(self.address, value)

    def generate(self, request: engine_pb2.GenerateRequest, timeout: float | None = None,
                 stream_interval: int = 1) -> GenerateCall:
        """Starts a request on the engine's shared stream (opened on first use, and again after
        it failed); iterate the call for GenerateResponses, cancel() it to abort the request."""
        if self._stream is None or self._stream.failed:
            self._stream = _Stream(self.stub, self.metadata)
        return self._stream.start(request, None if timeout is None else time.monotonic() + timeout, stream_interval)

    async def stats(self, timeout: float = 2.0) -> engine_pb2.StatsResponse:
        watcher = self._watcher
        request, ticket = watcher.stats_request(self.address) if watcher else (engine_pb2.StatsRequest(), None)
        try:
            response = await self.stub.Stats(request, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError:
            self.suspect = True
            raise
        if watcher is not None:
            watcher.stats_answered(self.address, ticket, response)
        return response

    async def set_state(self, state: str, role: str = "", timeout: float = 5.0) -> None:
        await self.stub.SetState(engine_pb2.SetStateRequest(state=state, role=role), timeout=timeout,
                                 metadata=self.metadata)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._channel is not None:
            await self._channel.close()


class EngineClients:
    """One client per engine address, shared by the supervisor, the router and the metrics;
    `watcher` sees their Stats calls (cluster/load.py's LoadPlane: these clients, watched by itself)."""

    def __init__(self, token: str = "", watcher: StatsWatcher | None = None):
        self.token = token
        self._watcher = watcher
        self._clients: dict[str, EngineClient] = {}

    def get(self, address: str) -> EngineClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = EngineClient(address, self.token, self._watcher)
        return client

    def peek(self, address: str) -> EngineClient | None:
        return self._clients.get(address)

    async def drop(self, address: str) -> None:
        client = self._clients.pop(address, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        for address in list(self._clients):
            await self.drop(address)

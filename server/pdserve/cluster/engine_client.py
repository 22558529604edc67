"""The front end's side of the engine RPC: channels to engines, local or on other nodes.

Each EngineClient also keeps what this front end knows of its engine's load: the last Stats
answer plus what this front end sent it since (the fresh load: a burst between two polls must
not all land on one engine), folded into one figure, `load`, that the router reads. Stats
answers carry the engine's KV events (engine/kv_events.py), which the client applies to the
node's KVIndex (cluster/kv_index.py) for cache-aware routing.
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable

import grpc

from pdserve._proto import engine_pb2, engine_pb2_grpc
from pdserve.cluster.kv_index import KVIndex
from pdserve.common.cluster_auth import call_metadata
from pdserve.common.constants import GRPC_MESSAGE_OPTIONS
from pdserve.common.errors import Cause, cause_named, cause_of

# An engine's load is counted in prompt tokens of work: its queued prefill tokens, plus this
# many tokens for each request it runs or queues (a request in a decode batch slows every step;
# one queued weighs like this many prompt tokens more to compute).
REQUEST_TOKENS = 256
# Added to the load of an engine that could not be reached lately: it is chosen only when no
# other engine is left, and suspect engines still keep their order among themselves.
SUSPECT_PENALTY = 1e12

LoadListener = Callable[[str, float], None]   # (address, load)
UNSYNCED = object()   # a client's incarnation before the router's first look at the registry


def merge_response(into: engine_pb2.GenerateResponse, later: engine_pb2.GenerateResponse) -> None:
    """Appends a later response of the same request to one not yet sent on."""
    into.text += later.text
    into.token_ids.extend(later.token_ids)
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
    def __init__(self, address: str, token: str = "", kv_index: KVIndex | None = None,
                 on_load: LoadListener | None = None):
        self.address = address
        self.metadata = call_metadata(token)   # the cluster secret, on every call
        self._channel: grpc.aio.Channel | None = None   # opened on the first call
        self._stub: engine_pb2_grpc.EngineStub | None = None
        self._stream: _Stream | None = None    # every request of this front end to the engine
        self.last_stats: engine_pb2.StatsResponse | None = None
        self.last_stats_at = 0.0   # time.monotonic() of the last answered Stats; 0: never
        # Unreachable lately (a call failed to connect, or Stats failed): routed around until
        # a Stats call answers again.
        self._suspect = False
        # Fresh load: totals of what this front end sent the engine, and their values when the
        # Stats call whose answer is last_stats went out (that answer already counts the rest).
        self.sent_tokens = self.sent_requests = 0
        self._base_tokens = self._base_requests = 0
        self._stats_load = 0.0      # the last answer's part of the load
        self._stats_waiting = 0     # its queued prompt tokens, less those of requests ended since
        self._answer_asked_at = 0.0   # when the Stats call of the last answer went out
        self.load = 0.0
        self._on_load = on_load
        # Cache-aware routing: the KV events applied so far, in the node's index.
        self.kv_index = kv_index if kv_index is not None else KVIndex()
        self.kv_cursor = 0            # the newest KV event id applied (0: none, ask for the whole set)
        self.incarnation: object = UNSYNCED    # of the engine at this address, as the registry said
        self._kv_epoch = 0            # bumped when the KV view starts over: late answers are not applied
        self._calls = self._answered = 0   # Stats calls sent; the newest one applied

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
        return self._suspect

    @suspect.setter
    def suspect(self, value: bool) -> None:
        if value != self._suspect:
            self._suspect = value
            self._update_load()

    @property
    def fresh_tokens(self) -> int:
        """Prompt tokens sent to this engine to compute since its last Stats answer."""
        return self.sent_tokens - self._base_tokens

    @property
    def fresh_requests(self) -> int:
        return self.sent_requests - self._base_requests

    def sent(self, tokens: int, requests: int = 1) -> None:
        """This front end sent the engine `requests` requests with `tokens` prompt tokens to compute."""
        self.sent_tokens += tokens
        self.sent_requests += requests
        self._update_load()

    def finished(self, tokens: int, sent_at: float, requests: int = 1) -> None:
        """A request sent at time.monotonic() sent_at ended (its prompt is computed). It leaves
        the load at once instead of at the next Stats answer: from the fresh load if no answer
        has counted it, else from the last answer's figures (which counted it queued or running)."""
        if self._answer_asked_at < sent_at:
            self._base_tokens = min(self._base_tokens + tokens, self.sent_tokens)
            self._base_requests = min(self._base_requests + requests, self.sent_requests)
        else:
            counted = min(tokens, self._stats_waiting)
            self._stats_waiting -= counted
            self._stats_load = max(self._stats_load - counted - REQUEST_TOKENS * requests, 0.0)
        self._update_load()

    def _update_load(self) -> None:
        """load = queued prompt tokens + REQUEST_TOKENS x requests (running, queued, awaiting
        their KV), as of the last answer plus what was sent since, + the share of KV blocks in
        use (< 1 token: it only breaks ties)."""
        self.load = (self._stats_load + self.sent_tokens - self._base_tokens
                     + REQUEST_TOKENS * (self.sent_requests - self._base_requests)
                     + (SUSPECT_PENALTY if self._suspect else 0.0))
        if self._on_load is not None:
            self._on_load(self.address, self.load)

    def generate(self, request: engine_pb2.GenerateRequest, timeout: float | None = None,
                 stream_interval: int = 1) -> GenerateCall:
        """Starts a request on the engine's shared stream (opened on first use, and again after
        it failed); iterate the call for GenerateResponses, cancel() it to abort the request."""
        if self._stream is None or self._stream.failed:
            self._stream = _Stream(self.stub, self.metadata)
        return self._stream.start(request, None if timeout is None else time.monotonic() + timeout, stream_interval)

    async def stats(self, timeout: float = 2.0) -> engine_pb2.StatsResponse:
        self._calls += 1
        call, epoch, sent = self._calls, self._kv_epoch, (self.sent_tokens, self.sent_requests)
        asked_at = time.monotonic()
        try:
            response = await self.stub.Stats(engine_pb2.StatsRequest(kv_events_after=self.kv_cursor),
                                             timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError:
            self.suspect = True
            raise
        if call > self._answered:   # a call that answers after a newer one changes nothing
            self._answered = call
            self.observe(response, sent, apply_kv=epoch == self._kv_epoch, asked_at=asked_at)
        return response

    def observe(self, stats: engine_pb2.StatsResponse, sent_before: tuple[int, int] | None = None,
                apply_kv: bool = True, asked_at: float | None = None) -> None:
        """Takes one Stats answer: its load figures (what was sent before the call went out,
        `sent_before`, is counted in them; what was sent after stays fresh), and its KV events."""
        self.last_stats, self.last_stats_at, self._suspect = stats, time.monotonic(), False
        self._answer_asked_at = self.last_stats_at if asked_at is None else asked_at
        self._stats_waiting = stats.waiting_prefill_tokens
        self._base_tokens, self._base_requests = sent_before or (self.sent_tokens, self.sent_requests)
        used = 1.0 - stats.num_free_blocks / stats.num_total_blocks if stats.num_total_blocks else 0.0
        self._stats_load = (stats.waiting_prefill_tokens + 0.5 * used
                            + REQUEST_TOKENS * (stats.num_running + stats.num_waiting + stats.num_awaiting_kv))
        if apply_kv:
            self.kv_index.apply(self.address, stats.stored_block_hashes, stats.removed_block_hashes,
                                stats.kv_events_reset)
            self.kv_cursor = stats.kv_event_id
        self._update_load()

    def forget_kv(self) -> None:
        """The engine at this address left or was replaced: its blocks are forgotten and the
        next Stats call asks for the whole set."""
        self.kv_index.drop(self.address)
        self.kv_cursor = 0
        self._kv_epoch += 1

    async def set_state(self, state: str, role: str = "", timeout: float = 5.0) -> None:
        await self.stub.SetState(engine_pb2.SetStateRequest(state=state, role=role), timeout=timeout,
                                 metadata=self.metadata)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._channel is not None:
            await self._channel.close()


class EngineClients:
    """One channel per engine address, shared by the supervisor, the router and the metrics,
    and the node's KVIndex that their Stats answers keep."""

    def __init__(self, token: str = ""):
        self.token = token
        self.kv_index = KVIndex()
        self._clients: dict[str, EngineClient] = {}
        self._listeners: list[LoadListener] = []

    def listen(self, listener: LoadListener) -> None:
        """listener(address, load) after every change of an engine's load (0 when its client goes)."""
        self._listeners.append(listener)

    def _load_changed(self, address: str, load: float) -> None:
        for listener in self._listeners:
            listener(address, load)

    def get(self, address: str) -> EngineClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = EngineClient(address, self.token, self.kv_index, self._load_changed)
        return client

    def peek(self, address: str) -> EngineClient | None:
        return self._clients.get(address)

    def sync(self, engines: dict[str, str]) -> None:
        """The registry changed; `engines` maps each engine address to the incarnation there
        now. A client whose engine left, or was replaced by a new process at the same address,
        forgets its KV view (a former process's blocks must not attract requests)."""
        for address, client in self._clients.items():
            incarnation = engines.get(address)
            if incarnation != client.incarnation:
                # a client's first look: its view is of this incarnation, unless the engine left
                if client.incarnation is not UNSYNCED or incarnation is None:
                    client.forget_kv()
                client.incarnation = incarnation

    async def drop(self, address: str) -> None:
        client = self._clients.pop(address, None)
        if client is not None:
            client._on_load = None
            self.kv_index.drop(address)
            self._load_changed(address, 0.0)
            await client.close()

    async def close(self) -> None:
        for address in list(self._clients):
            await self.drop(address)

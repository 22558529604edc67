"""The front end's side of the engine RPC: channels to engines, local or on other nodes."""
from __future__ import annotations

import time

import grpc

from pdserve._proto import engine_pb2, engine_pb2_grpc
from pdserve.common.cluster_auth import call_metadata
from pdserve.common.constants import GRPC_MESSAGE_OPTIONS


class EngineClient:
    def __init__(self, address: str, token: str = ""):
        self.address = address
        self.metadata = call_metadata(token)   # the cluster secret, on every call
        self.channel = grpc.aio.insecure_channel(address, options=GRPC_MESSAGE_OPTIONS)
        self.stub = engine_pb2_grpc.EngineStub(self.channel)
        self.last_stats: engine_pb2.StatsResponse | None = None
        self.last_stats_at = 0.0   # time.monotonic() of the last answered Stats; 0: never
        # Unreachable lately (a call failed to connect, or Stats failed): routed around until
        # a Stats call answers again.
        self.suspect = False

    def generate(self, request: engine_pb2.GenerateRequest, timeout: float | None = None):
        """A streaming call; iterate it for GenerateResponses, cancel() it to abort the request."""
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    async def stats(self, timeout: float = 2.0) -> engine_pb2.StatsResponse:
        try:
            self.last_stats = await self.stub.Stats(engine_pb2.StatsRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError:
            self.suspect = True
            raise
        self.last_stats_at, self.suspect = time.monotonic(), False
        return self.last_stats

    async def set_state(self, state: str, role: str = "", timeout: float = 5.0) -> None:
        await self.stub.SetState(engine_pb2.SetStateRequest(state=state, role=role), timeout=timeout,
                                 metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()


class EngineClients:
    """One channel per engine address, shared by the supervisor, the router and the metrics."""

    def __init__(self, token: str = ""):
        self.token = token
        self._clients: dict[str, EngineClient] = {}

    def get(self, address: str) -> EngineClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = EngineClient(address, self.token)
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

"""The front end's side of the engine RPC: channels to engines, local or on other nodes."""
from __future__ import annotations

import grpc

from pdserve._proto import engine_pb2, engine_pb2_grpc


class EngineClient:
    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = engine_pb2_grpc.EngineStub(self.channel)
        self.last_stats: engine_pb2.StatsResponse | None = None

    def generate(self, request: engine_pb2.GenerateRequest):
        """A streaming call; iterate it for GenerateResponses, cancel() it to abort the request."""
        return self.stub.Generate(request)

    async def stats(self, timeout: float = 2.0) -> engine_pb2.StatsResponse:
        self.last_stats = await self.stub.Stats(engine_pb2.StatsRequest(), timeout=timeout)
        return self.last_stats

    async def set_state(self, state: str, timeout: float = 5.0) -> None:
        await self.stub.SetState(engine_pb2.SetStateRequest(state=state), timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()


class EngineClients:
    """One channel per engine address, shared by the supervisor, the router and the metrics."""

    def __init__(self):
        self._clients: dict[str, EngineClient] = {}

    def get(self, address: str) -> EngineClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = EngineClient(address)
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

"""The front end's side of the engine RPC: a channel to one engine process."""
from __future__ import annotations

import grpc

from pdserve._proto import engine_pb2, engine_pb2_grpc


class EngineClient:
    def __init__(self, address: str, instance_id: str, role: str):
        self.address = address
        self.instance_id = instance_id
        self.role = role
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = engine_pb2_grpc.EngineStub(self.channel)
        self.last_stats: engine_pb2.StatsResponse | None = None

    def generate(self, request: engine_pb2.GenerateRequest):
        """A streaming call; iterate it for GenerateResponses, cancel() it to abort the request."""
        return self.stub.Generate(request)

    async def stats(self, timeout: float = 2.0) -> engine_pb2.StatsResponse:
        self.last_stats = await self.stub.Stats(engine_pb2.StatsRequest(), timeout=timeout)
        return self.last_stats

    async def close(self) -> None:
        await self.channel.close()

"""gRPC health checking (grpc.health.v1, grpcio's health package), what Kubernetes gRPC probes call.

Service "" (the server) and "inference.GRPCInferenceService" answer SERVING once the server is
ready (every model it serves is READY); a model's name answers SERVING while a version of it is
ready, NOT_SERVING otherwise; other names NOT_FOUND. Check computes the answer when asked; Watch
streams the changes, which a background task looks for twice a second.
"""
from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVER_NAMES = ("", "inference.GRPCInferenceService")


class Health(health_aio.HealthServicer):
    def __init__(self, service):
        super().__init__()
        self.service = service
        self._task: asyncio.Task | None = None

    def status_of(self, name: str):
        if name in SERVER_NAMES:
            return SERVING if self.service.server_ready() else NOT_SERVING
        if self.service.manager.knows(name):
            return SERVING if self.service.model_ready(name) else NOT_SERVING
        return None

    async def Check(self, request, context):
        status = self.status_of(request.service)
        if status is None:
            return await super().Check(request, context)  # NOT_FOUND with grpcio's message
        return health_pb2.HealthCheckResponse(status=status)

    async def _refresh(self) -> None:
        while True:
            names = list(SERVER_NAMES) + [name for name, _ in self.service.manager.index()]
            for name in dict.fromkeys(names):
                status = self.status_of(name)
                if status is not None:
                    await self.set(name, status)
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._refresh())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.enter_graceful_shutdown()

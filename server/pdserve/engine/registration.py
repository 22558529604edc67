"""The engine's own record in etcd: held under its lease, kept alive, re-registered after an outage.

A crashed engine's record goes when its lease expires (keepalive every TTL/3); a graceful stop
revokes the lease, so the record goes at once.
"""
from __future__ import annotations

import asyncio
import logging

from pdserve.common.etcd import EtcdClient, EtcdUnavailable
from pdserve.common.records import DEFAULT_TTL_S, EngineRecord, engine_key

log = logging.getLogger(__name__)


class EngineRegistration:
    def __init__(self, client: EtcdClient, cluster: str, record: EngineRecord, ttl: int = DEFAULT_TTL_S):
        self.client = client
        self.key = engine_key(cluster, record.model, record.instance_id)
        self.record = record
        self.ttl = ttl
        self.lease = 0
        self.keepalive_failures = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.ensure_future(self._keep_alive())

    async def _register(self) -> None:
        self.lease = await self.client.grant(self.ttl)
        await self.client.put(self.key, self.record.to_json(), lease=self.lease)

    async def set_state(self, state: str) -> None:
        self.record.state = state
        try:
            await self.client.put(self.key, self.record.to_json(), lease=self.lease)
        except EtcdUnavailable as exc:
            log.warning("could not publish state %s (%s); the keepalive loop re-registers", state, exc)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if await self.client.keepalive(self.lease) <= 0:
                    log.warning("lease %x expired (etcd was away longer than %d s): registering again", self.lease, self.ttl)
                    await self._register()
            except EtcdUnavailable as exc:
                self.keepalive_failures += 1
                log.warning("etcd keepalive failed (%s); serving on, retrying", exc)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        try:
            await self.client.revoke(self.lease)
        except EtcdUnavailable as exc:
            log.warning("could not revoke lease (%s); the record expires with its TTL", exc)
        await self.client.close()

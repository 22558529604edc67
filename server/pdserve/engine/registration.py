"""The engine's own record in etcd: held under its lease, kept alive, re-registered after an outage.

A crashed engine's record goes when its lease expires (keepalive every TTL/3); a graceful stop
revokes the lease, so the record goes at once. etcd being away never stops the engine: at start
or after an outage longer than the TTL, registration is retried with backoff until it lands.
"""
from __future__ import annotations

import asyncio
import logging

from pdserve.common.etcd import EtcdClient, EtcdUnavailable
from pdserve.common.records import DEFAULT_TTL_S, EngineRecord, engine_key

log = logging.getLogger(__name__)


class EngineRegistration:
    def __init__(self, client: EtcdClient, cluster: str, record: EngineRecord, ttl: int = DEFAULT_TTL_S,
                 token: str = ""):
        self.token = token
        self.client = client
        self.key = engine_key(cluster, record.model, record.instance_id)
        self.record = record
        self.ttl = ttl
        self.lease = 0
        self.keepalive_failures = 0
        self._task: asyncio.Task | None = None
        self._publish = asyncio.Lock()   # puts land in the order the calls came

    async def start(self) -> None:
        try:
            await self._register()
        except EtcdUnavailable as exc:
            log.warning("etcd is not reachable (%s); serving on and registering when it is", exc)
        self._task = asyncio.ensure_future(self._keep_alive())

    async def _register(self) -> None:
        self.lease = 0
        lease = await self.client.grant(self.ttl)
        await self.client.put(self.key, self.record.signed_json(self.token), lease=lease)
        self.lease = lease

    async def set_state(self, state: str, role: str = "") -> None:
        """Publishes the routing state and, when given, a new role (an AUTO instance's switch):
        the same key, lease and incarnation."""
        async with self._publish:
            self.record.state = state
            if role:
                self.record.role = role
            if not self.lease:
                return  # not registered yet: the registration carries the state when it lands
            try:
                await self.client.put(self.key, self.record.signed_json(self.token), lease=self.lease)
            except EtcdUnavailable as exc:
                log.warning("could not publish state %s (%s); the keepalive loop re-registers", state, exc)

    async def _keep_alive(self) -> None:
        backoff = 0.5
        while True:
            await asyncio.sleep(backoff if not self.lease else self.ttl / 3)
            try:
                if not self.lease:
                    await self._register()
                    log.info("registered in etcd as %s", self.key)
                elif await self.client.keepalive(self.lease) <= 0:
                    log.warning("lease %x expired (etcd was away longer than %d s): registering again", self.lease, self.ttl)
                    await self._register()
                backoff = 0.5
            except EtcdUnavailable as exc:
                self.keepalive_failures += 1
                backoff = min(backoff * 2, self.ttl / 3)
                log.warning("etcd unreachable (%s); serving on, retrying in %.1f s", exc, backoff)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        try:
            if self.lease:
                await self.client.revoke(self.lease)
        except EtcdUnavailable as exc:
            log.warning("could not revoke lease (%s); the record expires with its TTL", exc)
        await self.client.close()

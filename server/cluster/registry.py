"""Engine membership in etcd: engines register under a lease; front ends keep a live view.

Key layout (documented in docs/cluster.md):
    /pdserve/<cluster>/engines/<model>/<instance_id>  ->  JSON EngineRecord, attached to the
                                                          engine's own lease
An engine writes its record itself, so a crashed engine's record goes when its lease expires
(TTL 10 s, keepalive every TTL/3) and a graceful stop revokes the lease at once. Each start of
an engine process has a fresh incarnation id, so stale events of a former self never match.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

from pdserve.cluster.etcd import EtcdClient, EtcdUnavailable

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 10
STANDBY, READY, DRAINING = "standby", "ready", "draining"


def engines_prefix(cluster: str) -> str:
    return f"/pdserve/{cluster}/engines/"


def engine_key(cluster: str, model: str, instance_id: str) -> str:
    return f"{engines_prefix(cluster)}{model}/{instance_id}"


@dataclass
class EngineRecord:
    instance_id: str
    model: str
    version: str
    role: str                 # BOTH, PREFILL, DECODE
    device: str
    node: str
    address: str              # engine RPC host:port
    state: str = STANDBY      # standby (starting), ready (routable), draining (finishing its requests)
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    kv_transport: dict = field(default_factory=dict)   # the transport's handshake data
    capacity: dict = field(default_factory=dict)       # num_blocks, block_size, max_model_len, max_num_seqs
    started: float = field(default_factory=time.time)
    pid: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "EngineRecord":
        return cls(**json.loads(data))


class EngineRegistration:
    """The engine side: holds the lease, keeps it alive, re-registers after an etcd outage."""

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


class RegistryView:
    """The front end side: every engine record of the cluster, kept live by get-then-watch.

    When etcd is unreachable the view keeps its last contents (routing goes on) and retries;
    when etcd returns, a fresh get replaces the view and the differences are logged.
    """

    def __init__(self, client: EtcdClient, cluster: str):
        self.client = client
        self.prefix = engines_prefix(cluster)
        self.records: dict[str, EngineRecord] = {}
        self.connected = asyncio.Event()
        self.outages = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                revision, kvs = await self.client.get_prefix(self.prefix)
                fresh = {k: EngineRecord.from_json(v) for k, v, _ in kvs}
                self._log_diff(self.records, fresh)
                self.records = fresh
                self.connected.set()
                async for event in self.client.watch_prefix(self.prefix, revision + 1):
                    if event.kind == "put":
                        self.records[event.key] = EngineRecord.from_json(event.value)
                    else:
                        gone = self.records.pop(event.key, None)
                        if gone:
                            log.info("engine %s (%s %s) left the cluster", gone.instance_id, gone.model, gone.role)
            except EtcdUnavailable as exc:
                if self.connected.is_set():
                    self.outages += 1
                    log.warning("etcd unreachable (%s): routing with the last view of %d engines", exc, len(self.records))
                self.connected.clear()
                await asyncio.sleep(1.0)

    @staticmethod
    def _log_diff(old: dict, new: dict) -> None:
        for key in old.keys() - new.keys():
            log.warning("engine %s vanished while etcd was unreachable", old[key].instance_id)
        for key in new.keys() - old.keys():
            if old:
                log.info("engine %s joined", new[key].instance_id)

    def engines(self, model: str, version: str | None = None, roles: tuple[str, ...] = ("BOTH", "DECODE", "PREFILL"),
                states: tuple[str, ...] = (READY,)) -> list[EngineRecord]:
        return [r for r in self.records.values()
                if r.model == model and (version is None or r.version == version)
                and r.role in roles and r.state in states]

    def forget(self, instance_id: str) -> None:
        """Drops an engine known to be dead before etcd says so (its lease may take TTL seconds)."""
        for key in [k for k, r in self.records.items() if r.instance_id == instance_id]:
            del self.records[key]

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

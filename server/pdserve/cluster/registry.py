"""The front end's live view of every engine record of the cluster (get, then watch).

The record format and key layout are common/records.py; engines write their own records
(engine/registration.py).
"""
from __future__ import annotations

import asyncio
import logging

from pdserve.common.etcd import EtcdClient, EtcdUnavailable
from pdserve.common.records import READY, EngineRecord, engines_prefix

log = logging.getLogger(__name__)


def _parse(key: str, value: bytes, token: str) -> EngineRecord | None:
    """A record this node cannot read or trust is skipped and logged, never fatal to the view."""
    try:
        return EngineRecord.from_json(value, token)
    except (ValueError, TypeError) as exc:
        log.error("ignoring the engine record %s: %s", key, exc)
        return None


class RegistryView:
    """The front end side: every engine record of the cluster, kept live by get-then-watch.

    When etcd is unreachable the view keeps its last contents (routing goes on) and retries;
    when etcd returns, a fresh get replaces the view and the differences are logged.
    """

    def __init__(self, client: EtcdClient, cluster: str, token: str = ""):
        self.client = client
        self.token = token        # records must be signed with it (when the cluster has one)
        self.prefix = engines_prefix(cluster)
        self.records: dict[str, EngineRecord] = {}   # change it only through the methods below
        self.generation = 0       # bumped on every change of records (the router rebuilds its lists)
        self.connected = asyncio.Event()
        self.outages = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                revision, kvs = await self.client.get_prefix(self.prefix)
                fresh = {k: r for k, v, _ in kvs if (r := _parse(k, v, self.token)) is not None}
                self._log_diff(self.records, fresh)
                self.records = fresh
                self.generation += 1
                self.connected.set()
                async for event in self.client.watch_prefix(self.prefix, revision + 1):
                    if event.kind == "put":
                        record = _parse(event.key, event.value, self.token)
                        if record is not None:
                            self.records[event.key] = record
                            self.generation += 1
                    else:
                        gone = self.records.pop(event.key, None)
                        if gone:
                            self.generation += 1
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
            self.generation += 1

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

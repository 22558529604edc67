"""The front end's live view of the cluster's records in etcd (get, then watch): every engine
record, and every model record (the configs that nodes publish of the models they serve).

The record formats and key layout are common/records.py; engines write their own records
(engine/registration.py), nodes their model records (cluster/publisher.py).
"""
from __future__ import annotations

import asyncio
import logging

from pdserve.common.etcd import EtcdClient, EtcdUnavailable
from pdserve.common.records import (READY, EngineRecord, ModelRecord, cluster_prefix, engines_prefix,
                                    models_prefix)

log = logging.getLogger(__name__)


class RegistryView:
    """The front end side: every engine and model record of the cluster, kept live by one
    get-then-watch of the cluster's prefix.

    When etcd is unreachable the view keeps its last contents (routing goes on) and retries;
    when etcd returns, a fresh get replaces the view and the differences are logged.
    """

    def __init__(self, client: EtcdClient, cluster: str, token: str = ""):
        self.client = client
        self.token = token        # records must be signed with it (when the cluster has one)
        self.prefix = cluster_prefix(cluster)
        self.kinds = ((engines_prefix(cluster), EngineRecord, "engine record"),
                      (models_prefix(cluster), ModelRecord, "model record"))
        self.records: dict[str, EngineRecord] = {}   # change it only through the methods below
        self.generation = 0       # bumped on every change of records (the router rebuilds its lists)
        self.models: dict[str, ModelRecord] = {}           # the model configs nodes publish, by key
        self.model_nodes: dict[str, set[str]] = {}         # every node seen publishing each model
        self.connected = asyncio.Event()
        self.outages = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                revision, kvs = await self.client.get_prefix(self.prefix)
                fresh = {k: r for k, v, _ in kvs if (r := self._parse(k, v)) is not None}
                engines = {k: r for k, r in fresh.items() if isinstance(r, EngineRecord)}
                self._log_diff(self.records, engines)
                self.records = engines
                self.generation += 1
                self.models = {k: r for k, r in fresh.items() if isinstance(r, ModelRecord)}
                for record in self.models.values():
                    self.model_nodes.setdefault(record.model, set()).add(record.node)
                self.connected.set()
                async for event in self.client.watch_prefix(self.prefix, revision + 1):
                    if event.kind == "put":
                        record = self._parse(event.key, event.value)
                        if isinstance(record, EngineRecord):
                            self.records[event.key] = record
                            self.generation += 1
                        elif isinstance(record, ModelRecord):
                            if event.key not in self.models:
                                log.info("model %s version %s published by node %s", record.model, record.version,
                                         record.node)
                            self.models[event.key] = record
                            self.model_nodes.setdefault(record.model, set()).add(record.node)
                    elif gone := self.records.pop(event.key, None):
                        self.generation += 1
                        log.info("engine %s (%s %s) left the cluster", gone.instance_id, gone.model, gone.role)
                    elif gone := self.models.pop(event.key, None):
                        log.info("model %s version %s withdrawn by node %s", gone.model, gone.version, gone.node)
            except EtcdUnavailable as exc:
                if self.connected.is_set():
                    self.outages += 1
                    log.warning("etcd unreachable (%s): routing with the last view of %d engines", exc, len(self.records))
                self.connected.clear()
                await asyncio.sleep(1.0)

    def _parse(self, key: str, value: bytes) -> EngineRecord | ModelRecord | None:
        """A record this node cannot read or trust is skipped and logged, never fatal to the view;
        other keys under the cluster's prefix are not the view's to read."""
        for prefix, kind, what in self.kinds:
            if key.startswith(prefix):
                try:
                    return kind.from_json(value, self.token)
                except (ValueError, TypeError) as exc:
                    log.error("ignoring the %s %s: %s", what, key, exc)
                    return None
        return None

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

    def can_generate(self, model: str, version: str) -> bool:
        """A DECODE or BOTH engine of the model version is ready somewhere in the cluster."""
        return bool(self.engines(model, version, roles=("BOTH", "DECODE")))

    def published(self, model: str) -> list[ModelRecord]:
        """The READY versions of model that nodes publish (one record per node and version)."""
        return [r for r in self.models.values() if r.model == model and r.state == "READY"]

    def forget(self, instance_id: str) -> None:
        """Drops an engine known to be dead before etcd says so (its lease may take TTL seconds)."""
        for key in [k for k, r in self.records.items() if r.instance_id == instance_id]:
            del self.records[key]
            self.generation += 1

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

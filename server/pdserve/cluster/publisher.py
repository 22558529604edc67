"""This node's model records in etcd: the config of every model version it serves, on its lease.

A node that serves a model from its repository publishes, per READY version, what ModelConfig
answers (common/records.py: ModelRecord under /pdserve/<cluster>/models/<model>/<version>/<node>),
so that every node of the cluster, a router-only one included, can serve the model through its
engines. The records hang on one lease of this node: a graceful stop revokes it (they go at
once), a crash lets it expire. The repository manager says what serves (`serve`); one task
writes etcd, bringing it in line with that after every change, keeping the lease alive, and
writing everything again when the lease was lost (etcd away longer than the TTL) or a write
failed. A node that publishes nothing holds no lease.
"""
from __future__ import annotations

import asyncio
import logging
import time

from pdserve.common.etcd import EtcdClient, EtcdUnavailable
from pdserve.cluster.model_files import blob_entries, digest_of
from pdserve.common.records import DEFAULT_TTL_S, ModelRecord, model_key, models_prefix

log = logging.getLogger(__name__)


class ModelPublisher:
    def __init__(self, client: EtcdClient, cluster: str, node: str, ttl: int = DEFAULT_TTL_S, token: str = ""):
        self.client = client
        self.cluster = cluster
        self.node = node
        self.ttl = ttl
        self.token = token
        self.wanted: dict[str, bytes] = {}     # key -> signed record or file chunk: what this node serves now
        self._records: dict[str, bytes] = {}   # key -> signed record
        self._blobs: dict[str, dict[str, bytes]] = {}   # model -> its tokenizer files' chunks (cluster/model_files.py)
        self._written: dict[str, bytes] = {}   # what etcd holds under the lease, as far as this node knows
        self.lease = 0
        self._renewed = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def serve(self, model: str, configs: dict[int, dict], files: dict[int, dict[str, bytes]] | None = None) -> None:
        """The versions of model this node serves now, with their configs (protobuf JSON) and
        tokenizer files (name -> contents); an empty dict withdraws the model. Written to etcd in
        the background."""
        prefix = f"{models_prefix(self.cluster)}{model}/"
        for key in [k for k in self._records if k.startswith(prefix)]:
            del self._records[key]
        blobs: dict[str, bytes] = {}
        for version, config in configs.items():
            version_files = (files or {}).get(version, {})
            digests = {name: digest_of(data) for name, data in version_files.items()}
            for name, data in version_files.items():
                blobs.update(blob_entries(self.cluster, digests[name], data))
            record = ModelRecord(model, str(version), self.node, config, files=digests)
            self._records[model_key(self.cluster, model, str(version), self.node)] = record.signed_json(self.token)
        self._blobs[model] = blobs
        self.wanted = {key: value for chunks in self._blobs.values() for key, value in chunks.items()}
        self.wanted.update(self._records)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            self._wake.clear()
            try:
                await self._sync()
                backoff = 0.5
                wait = self._renewed + self.ttl / 3 - time.monotonic() if self.lease else None
            except EtcdUnavailable as exc:
                log.warning("could not publish this node's models in etcd (%s); retrying in %.1f s", exc, backoff)
                wait, backoff = backoff, min(backoff * 2, self.ttl / 3)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _sync(self) -> None:
        if self.lease and time.monotonic() - self._renewed >= self.ttl / 3:
            if await self.client.keepalive(self.lease) <= 0:
                log.warning("model records' lease %x expired (etcd was away longer than %d s): publishing again",
                            self.lease, self.ttl)
                self.lease, self._written = 0, {}
            else:
                self._renewed = time.monotonic()
        if not self.lease:
            if not self.wanted:
                return
            self.lease, self._written = await self.client.grant(self.ttl), {}
            self._renewed = time.monotonic()
        for key in [k for k in self._written if k not in self.wanted]:
            await self.client.delete(key)
            del self._written[key]
            log.info("withdrew %s", key)
        for key, value in list(self.wanted.items()):
            if self._written.get(key) != value:
                await self.client.put(key, value, lease=self.lease)
                self._written[key] = value
                log.info("published %s", key)

    async def close(self) -> None:
        """Withdraws every record at once (revokes the lease)."""
        if self._task:
            self._task.cancel()
        if self.lease:
            try:
                await self.client.revoke(self.lease)
            except EtcdUnavailable as exc:
                log.warning("could not revoke the model records' lease (%s); they expire with its TTL", exc)

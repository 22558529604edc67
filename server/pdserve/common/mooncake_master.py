"""The cluster's Mooncake Store master (kv_store: mooncake, engine/kv_store.py): the private
master process (MooncakeMaster, a sibling of common/etcd_server.py's EtcdProcess) and the one
place a node decides which master its engines join (KVStoreMasters).

A node uses the master it is given (--kv-store-endpoint), else the one the cluster published in
etcd (/pdserve/<cluster>/kv_store/mooncake, on the lease of the node that runs it), else it
starts its own and publishes it there, so the nodes that come next share it. This happens when
the first engine that wants the store starts, not before: a node without kv_store runs no
master. The master holds the store's metadata only; the blocks live in the memory the engines
lend it, so a master that dies costs the blocks (engines compute them again), never a request.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import subprocess
import tempfile
import time

from pdserve.common.etcd import EtcdClient, EtcdUnavailable
from pdserve.common.etcd_server import _free_port
from pdserve.common import process
from pdserve.common.records import KVStoreRecord, kv_store_key

log = logging.getLogger(__name__)


def master_binary() -> str:
    """mooncake_master from the mooncake-transfer-engine wheel (found without importing it)."""
    spec = importlib.util.find_spec("mooncake")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "mooncake_master")
        if os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("mooncake_master is not installed: kv_store mooncake needs the "
                            "mooncake-transfer-engine-non-cuda package (pip install 'pdserve[mooncake]')")


class MooncakeMaster:
    """A private mooncake_master listening on host (metadata only: clients handshake peer to peer)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_dir: str | None = None):
        self.binary = master_binary()
        self.host = host
        self.port = port or _free_port()
        self._port_chosen = port is None
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="pdserve-mooncake-")
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> "MooncakeMaster":
        """Starts it and waits until it accepts connections; a chosen port taken meanwhile is chosen again."""
        for _ in range(attempts):
            if self._start_once(timeout):
                return self
            if self._port_chosen:
                self.port = _free_port()
        raise RuntimeError(f"mooncake_master could not start {attempts} times; see {self.log.name}")

    def _start_once(self, timeout: float) -> bool:
        self.log = open(os.path.join(self.log_dir, "mooncake_master.log"), "ab")
        self.proc = process.spawn([self.binary, f"--rpc_address={self.host}", f"--rpc_port={self.port}",
                                   f"--metrics_port={_free_port()}", "--enable_metric_reporting=false"], self.log)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.log.close()
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mooncake_master did not start on {self.endpoint}; see {self.log.name}")

    def stop(self) -> None:
        process.stop(self.proc)


class KVStoreMasters:
    """Which Mooncake master this node's engines join: endpoint() decides once (see the module)."""

    def __init__(self, etcd: EtcdClient, cluster: str, node: str, host: str, run_dir: str, given: str = "",
                 token: str = "", ttl: int = 10):
        self.etcd, self.cluster, self.node, self.host = etcd, cluster, node, host
        self.run_dir, self.given, self.token, self.ttl = run_dir, given, token, ttl
        self.master: MooncakeMaster | None = None
        self._endpoint = given
        self._lock = asyncio.Lock()
        self._lease = 0
        self._keepalive: asyncio.Task | None = None

    async def endpoint(self) -> str:
        async with self._lock:
            if not self._endpoint:
                self._endpoint = await self._published() or await self._start()
            return self._endpoint

    async def _published(self) -> str:
        try:
            _, found = await self.etcd.get_prefix(kv_store_key(self.cluster))
        except EtcdUnavailable as exc:
            log.warning("etcd did not say whether the cluster has a KV store master (%s); starting one", exc)
            return ""
        for _, value, _ in found:
            try:
                record = KVStoreRecord.from_json(value, self.token)
            except (ValueError, TypeError) as exc:
                log.warning("ignoring the KV store record in etcd: %s", exc)
                continue
            log.info("KV store: the cluster's Mooncake master %s (node %s)", record.master, record.node)
            return record.master
        return ""

    async def _start(self) -> str:
        folder = os.path.join(self.run_dir, "mooncake-master")
        os.makedirs(folder, exist_ok=True)
        self.master = await asyncio.get_running_loop().run_in_executor(
            None, lambda: MooncakeMaster(self.host, log_dir=folder).start())
        log.info("private Mooncake master on %s, pid %d (pass --kv-store-endpoint to share one)",
                 self.master.endpoint, self.master.proc.pid)
        self._keepalive = asyncio.ensure_future(self._publish(self.master.endpoint))
        return self.master.endpoint

    async def _publish(self, endpoint: str) -> None:
        """Keeps the record on this node's lease (written again when the lease was lost)."""
        record = KVStoreRecord("mooncake", endpoint, self.node).signed_json(self.token)
        while True:
            try:
                if not self._lease or not await self.etcd.keepalive(self._lease):
                    self._lease = await self.etcd.grant(self.ttl)
                    await self.etcd.put(kv_store_key(self.cluster), record, lease=self._lease)
                await asyncio.sleep(self.ttl / 3)
            except EtcdUnavailable as exc:
                log.warning("could not publish the KV store master in etcd (%s); retrying", exc)
                self._lease = 0
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            if self._lease:
                try:
                    await self.etcd.revoke(self._lease)
                except EtcdUnavailable:
                    pass
        if self.master is not None:
            self.master.stop()

"""A small asyncio etcd v3 client (over the generated stubs etcd-sdk-python ships) and a
private etcd server process.

Only what membership needs: put/get/delete, leases with keepalive, and prefix watches from a
revision. Every call takes a deadline; endpoints are tried in order.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from pyetcd import etcdrpc

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 3.0


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with prefix."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[:i + 1])
    return b"\0"


@dataclass
class WatchEvent:
    kind: str          # "put" or "delete"
    key: str
    value: bytes
    revision: int


class EtcdUnavailable(ConnectionError):
    pass


class EtcdClient:
    def __init__(self, endpoints: list[str]):
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        self.endpoints = endpoints
        self._index = 0
        self._open(endpoints[0])

    def _open(self, endpoint: str) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.kv = etcdrpc.KVStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.watcher = etcdrpc.WatchStub(self.channel)

    async def _rotate(self) -> None:
        if len(self.endpoints) > 1:
            await self.channel.close()
            self._index = (self._index + 1) % len(self.endpoints)
            self._open(self.endpoints[self._index])

    async def _call(self, fn, request):
        try:
            return await fn(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            await self._rotate()
            raise EtcdUnavailable(f"etcd {self.endpoints[self._index]}: {exc.code().name} {exc.details()}") from exc

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        response = await self._call(self.kv.Put, etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease))
        return response.header.revision

    async def get_prefix(self, prefix: str) -> tuple[int, list[tuple[str, bytes, int]]]:
        """Returns the store's revision and every (key, value, lease id) under prefix."""
        key = prefix.encode()
        response = await self._call(self.kv.Range, etcdrpc.RangeRequest(key=key, range_end=prefix_end(key)))
        return response.header.revision, [(kv.key.decode(), kv.value, kv.lease) for kv in response.kvs]

    async def delete(self, key: str) -> None:
        await self._call(self.kv.DeleteRange, etcdrpc.DeleteRangeRequest(key=key.encode()))

    async def grant(self, ttl: int) -> int:
        response = await self._call(self.lease.LeaseGrant, etcdrpc.LeaseGrantRequest(TTL=ttl))
        return response.ID

    async def revoke(self, lease_id: int) -> None:
        await self._call(self.lease.LeaseRevoke, etcdrpc.LeaseRevokeRequest(ID=lease_id))

    async def keepalive(self, lease_id: int) -> int:
        """Refreshes a lease once; returns its TTL, 0 when the lease no longer exists."""
        call = self.lease.LeaseKeepAlive(timeout=CALL_TIMEOUT_S)
        try:
            await call.write(etcdrpc.LeaseKeepAliveRequest(ID=lease_id))
            response = await call.read()
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            await self._rotate()
            raise EtcdUnavailable(f"etcd keepalive: {exc.code().name} {exc.details()}") from exc
        finally:
            call.cancel()
        return response.TTL if response is not grpc.aio.EOF else 0

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Yields every change under prefix from start_revision on; raises EtcdUnavailable when cut."""
        key = prefix.encode()
        call = self.watcher.Watch()
        try:
            await call.write(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=key, range_end=prefix_end(key), start_revision=start_revision)))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF or response.canceled:
                    raise EtcdUnavailable(f"etcd watch ended: {getattr(response, 'cancel_reason', 'EOF')}")
                for ev in response.events:
                    kind = "delete" if ev.type == ev.DELETE else "put"
                    yield WatchEvent(kind, ev.kv.key.decode(), ev.kv.value, ev.kv.mod_revision)
        except grpc.aio.AioRpcError as exc:
            await self._rotate()
            raise EtcdUnavailable(f"etcd watch: {exc.code().name} {exc.details()}") from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()


def die_with_parent() -> None:
    """Linux: the calling process gets SIGTERM when its parent dies, even by kill -9, so no
    child (an engine, the private etcd) outlives the front end that started it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdProcess:
    """A private single-member etcd on loopback: pdserve's default without --etcd-endpoints,
    and the tests' real etcd. Its data folder outlives stop(), so a start() after it keeps
    the leases and records (the tests' etcd-restart case)."""

    def __init__(self, data_dir: str | None = None, client_port: int | None = None):
        self.binary = shutil.which("etcd") or "/usr/bin/etcd"
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="pdserve-etcd-")
        os.makedirs(self.data_dir, exist_ok=True)
        self.client_port = client_port or _free_port()
        self.peer_port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 30.0) -> "EtcdProcess":
        if not os.path.exists(self.binary):
            raise FileNotFoundError("etcd is not installed: `make setup` installs Debian's etcd-server")
        url, peer = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        self.log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--name", "pdserve", "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"pdserve={peer}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"etcd did not start on {self.endpoint}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

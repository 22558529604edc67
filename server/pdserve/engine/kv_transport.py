"""Moving KV blocks from a prefill engine's pool into a decode engine's pool.

The decode side registers its pool and publishes a handshake (in its etcd record and in each
prefill request); the prefill side writes whole blocks into it with one-sided writes. Blocks
are contiguous in the pool (see attention.py), so a run of consecutive blocks on both sides is
one transfer. Another transport (NIXL, HCCL) implements the same three methods.
"""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    pass


@dataclass(frozen=True)
class KVDestination:
    """Where a prompt's KV goes: the decode engine's pool (its handshake) and reserved blocks."""
    transport: str
    protocol: str
    session: str
    base_address: int
    block_bytes: int
    block_ids: tuple[int, ...]


class KVTransport(ABC):
    name = "abstract"

    @abstractmethod
    def register_pool(self, pool: torch.Tensor) -> None:
        """Makes the KV pool addressable by peers (decode side) and readable (prefill side)."""

    @abstractmethod
    def handshake(self) -> dict:
        """What a peer needs to write into this pool."""

    @abstractmethod
    def write_blocks(self, peer: KVDestination, src_blocks: list[int], dst_blocks: list[int]) -> int:
        """Writes local blocks into the peer's blocks; returns the bytes written or raises TransferError."""


def contiguous_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Groups (src, dst) block pairs into runs that are consecutive on both sides: (src, dst, length)."""
    runs: list[list[int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


class MooncakeTransport(KVTransport):
    """Mooncake's transfer engine, handshaking peer to peer (no metadata server).

    protocol "tcp" works on any host (mooncake-transfer-engine-non-cuda); "rdma" where HCAs
    exist; the Ascend build of Mooncake provides its own protocol for NPU memory.

    host only names this engine to its peers: Mooncake binds its handshake port to 0.0.0.0 and
    its TCP data port to [::] whatever host is, and has no setting for it (MC_TCP_BIND_ADDRESS
    only renames the announced address, outside P2P handshake mode); docs/security.md has the
    source references and the firewall rule.
    """
    name = "mooncake"

    def __init__(self, host: str, protocol: str = "tcp", device_name: str = ""):
        os.environ.setdefault("GLOG_minloglevel", "2")  # Mooncake logs every handshake at INFO
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise TransferError("kv_transport mooncake needs the mooncake-transfer-engine-non-cuda package "
                                f"(pip install 'pdserve[mooncake]'): {exc}") from exc
        self.engine = TransferEngine()
        if self.engine.initialize(host, "P2PHANDSHAKE", protocol, device_name) != 0:
            raise TransferError(f"Mooncake transfer engine failed to initialize on {host} over {protocol}")
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        self.protocol = protocol
        self.base = 0
        self.block_bytes = 0

    def register_pool(self, pool: torch.Tensor) -> None:
        if pool.device.type != "cpu":
            raise TransferError(f"this Mooncake build moves host memory only; the KV pool is on {pool.device}")
        self.pool = pool
        self.base = pool.data_ptr()
        self.block_bytes = pool[0].numel() * pool.element_size()
        if self.engine.register_memory(self.base, pool.numel() * pool.element_size()) != 0:
            raise TransferError("Mooncake could not register the KV pool")

    def handshake(self) -> dict:
        return {"transport": self.name, "protocol": self.protocol, "session": self.session,
                "base_address": self.base, "block_bytes": self.block_bytes}

    def write_blocks(self, peer: KVDestination, src_blocks: list[int], dst_blocks: list[int]) -> int:
        if peer.block_bytes != self.block_bytes:
            raise TransferError(f"KV block size differs: here {self.block_bytes} bytes, peer {peer.block_bytes}; "
                                "prefill and decode engines need the same model, dtype and kv_block_size")
        srcs, dsts, lengths = [], [], []
        for s, d, n in contiguous_runs(src_blocks, dst_blocks):
            srcs.append(self.base + s * self.block_bytes)
            dsts.append(peer.base_address + d * self.block_bytes)
            lengths.append(n * self.block_bytes)
        status = self.engine.batch_transfer_sync_write(peer.session, srcs, dsts, lengths)
        if status != 0:
            raise TransferError(f"Mooncake write to {peer.session} failed with status {status}")
        return sum(lengths)


def make_transport(kind: str, host: str) -> KVTransport | None:
    """kv_transport parameter: "none", "mooncake" (TCP) or "mooncake:<protocol>"."""
    if not kind or kind == "none":
        return None
    name, _, protocol = kind.partition(":")
    if name == "mooncake":
        return MooncakeTransport(host, protocol or "tcp")
    raise TransferError(f"kv_transport '{kind}' is unknown; use mooncake, mooncake:rdma or none")

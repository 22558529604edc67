"""Moving KV blocks from a prefill engine's pool into a decode engine's pool.

The decode side registers its pool and publishes a handshake (in its etcd record and in each
prefill request); the prefill side writes into it with one-sided writes, layer by layer: as
soon as the model has computed a layer, that layer's KV of the step's blocks goes out
(submit_layer, asynchronous), while the next layers compute; the step ends by waiting for
what is still in flight (wait). The pool is stored layer-major (model_runner.py), so one layer
of a run of consecutive blocks on both sides is one contiguous region: one transfer. Another
transport (NIXL, HCCL) implements the same four methods.
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
    block_bytes: int         # one layer of one block (K and V)
    block_ids: tuple[int, ...]
    held_blocks: int = 0     # leading block_ids that already hold the prompt's KV: not written
    layer_stride: int = 0    # bytes from one layer's blocks to the next layer's


class KVTransport(ABC):
    name = "abstract"

    @abstractmethod
    def register_pool(self, pool: torch.Tensor) -> None:
        """Makes the KV pool addressable by peers (decode side) and readable (prefill side)."""

    @abstractmethod
    def handshake(self) -> dict:
        """What a peer needs to write into this pool (KVDestination's fields but block_ids)."""

    @abstractmethod
    def submit_layer(self, peer: KVDestination, layer: int, src_blocks: list[int], dst_blocks: list[int]):
        """Starts writing one layer of local blocks into the peer's blocks, one batch; returns a
        handle for wait() and the bytes it moves. Raises TransferError."""

    @abstractmethod
    def wait(self, handles: list) -> None:
        """Returns when every handle's transfer has landed; raises TransferError if one failed."""


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
    only renames the announced address, outside P2P handshake mode). Engines started by pdserve
    preload engine/bind_host.c, which moves those binds onto host (docs/security.md).
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
        self.block_bytes = pool[0, 0].numel() * pool.element_size()
        self.layer_stride = pool.stride(1) * pool.element_size()
        if pool.stride(0) * pool.element_size() != self.block_bytes:
            raise TransferError("the KV pool must be stored layer-major (blocks of one layer contiguous)")
        if self.engine.register_memory(self.base, pool.numel() * pool.element_size()) != 0:
            raise TransferError("Mooncake could not register the KV pool")

    def handshake(self) -> dict:
        return {"transport": self.name, "protocol": self.protocol, "session": self.session,
                "base_address": self.base, "block_bytes": self.block_bytes, "layer_stride": self.layer_stride}

    def submit_layer(self, peer: KVDestination, layer: int, src_blocks: list[int], dst_blocks: list[int]):
        if peer.block_bytes != self.block_bytes:
            raise TransferError(f"KV block size differs: here {self.block_bytes} bytes, peer {peer.block_bytes}; "
                                "prefill and decode engines need the same model, dtype and kv_block_size")
        srcs, dsts, lengths = [], [], []
        src_layer, dst_layer = self.base + layer * self.layer_stride, peer.base_address + layer * peer.layer_stride
        for s, d, n in contiguous_runs(src_blocks, dst_blocks):
            srcs.append(src_layer + s * self.block_bytes)
            dsts.append(dst_layer + d * self.block_bytes)
            lengths.append(n * self.block_bytes)
        batch = self.engine.batch_transfer_async_write(peer.session, srcs, dsts, lengths)
        if batch <= 0:
            raise TransferError(f"Mooncake could not start a write to {peer.session} (batch id {batch})")
        return batch, sum(lengths)

    def wait(self, handles: list) -> None:
        # Mooncake polls until every batch has landed (the GIL released), then frees them.
        if handles and self.engine.get_batch_transfer_status(list(handles)) != 0:
            raise TransferError("a Mooncake write failed or timed out")


def make_transport(kind: str, host: str) -> KVTransport | None:
    """kv_transport parameter: "none", "mooncake" (TCP) or "mooncake:<protocol>"."""
    if not kind or kind == "none":
        return None
    name, _, protocol = kind.partition(":")
    if name == "mooncake":
        return MooncakeTransport(host, protocol or "tcp")
    raise TransferError(f"kv_transport '{kind}' is unknown; use mooncake, mooncake:rdma or none")

"""Moving KV blocks from a prefill engine's pool into a decode engine's pool.

The decode side registers its pool and publishes a handshake (in its etcd record and in each
prefill request); the prefill side writes into it with one-sided writes, layer by layer: as
soon as the model has computed a layer, that layer's KV of the step's blocks goes out
(submit_layer, asynchronous), while the next layers compute; the step ends by waiting for
what is still in flight (wait). The pool is stored layer-major (model_runner.py), so one layer
of a run of consecutive blocks on both sides is one contiguous region: one transfer. Another
transport (NIXL, HCCL) implements the same four methods.

Tensor parallelism: every rank of an instance has its own pool and transport, holding a range of
the KV heads (hold_heads). A decode instance's destination lists every rank's pool
(KVDestination.pools); each prefill rank writes the heads it holds into the pools that own them
(engine/parallel.py: handoff_plan, slot_pieces). Where the two sides split the heads alike, a
block is still one region; where they do not, a slice of a block's heads is one strided piece
per slot.
"""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pdserve.engine.parallel import HeadCopy, copies_from, handoff_plan, slot_pieces, split

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    pass


@dataclass(frozen=True)
class KVPool:
    """One rank's pool of a tensor-parallel decode instance: its handshake and its KV heads."""
    session: str
    base_address: int
    block_bytes: int
    layer_stride: int
    kv_heads: tuple[int, int]    # [first, stop) of the model's KV heads


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
    pools: tuple[KVPool, ...] = ()   # a tensor-parallel decode instance's ranks (empty: the pool above, every head)

    def rank_pools(self, num_kv_heads: int) -> tuple[KVPool, ...]:
        return self.pools or (KVPool(self.session, self.base_address, self.block_bytes, self.layer_stride,
                                     (0, num_kv_heads)),)


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

    def hold_heads(self, kv_heads: range, num_kv_heads: int) -> None:
        """A tensor-parallel rank: its pool holds these of the model's KV heads (default: all)."""
        self.kv_heads, self.num_kv_heads = kv_heads, num_kv_heads

    def check(self, peer: KVDestination) -> None:
        """Raises TransferError when this pool cannot write into the peer's (before any work)."""


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
        self.in_flight: list[_Batch] = []

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
        # [blocks, layers, 2, block_size, kv_heads, head_dim]: a block's slots, each its heads side by side
        self.slots = pool.shape[2] * pool.shape[3] if pool.dim() == 6 else 1
        self.hold_heads(range(pool.shape[-2]), pool.shape[-2])

    def handshake(self) -> dict:
        return {"transport": self.name, "protocol": self.protocol, "session": self.session,
                "base_address": self.base, "block_bytes": self.block_bytes, "layer_stride": self.layer_stride}

    def _copies(self, peer: KVDestination) -> list[tuple[HeadCopy, KVPool]]:
        """This rank's pieces of the handoff: which of its heads go into which of the peer's pools."""
        pools = peer.rank_pools(self.num_kv_heads)
        try:
            plan = handoff_plan(self.num_kv_heads, self.num_kv_heads // len(self.kv_heads), len(pools))
        except ValueError as exc:
            raise TransferError(f"the decode instance's {len(pools)} pools cannot take this model's KV: {exc}") from exc
        owned = [(p.kv_heads[0], p.kv_heads[1]) for p in pools]
        expected = [(r.start, r.stop) for r in (split(self.num_kv_heads, len(pools), j) for j in range(len(pools)))]
        if owned != expected:
            raise TransferError(f"the decode instance's pools hold KV heads {owned}, not {expected} of this model's "
                                f"{self.num_kv_heads}; prefill and decode engines need the same model")
        rank = self.kv_heads.start // len(self.kv_heads)
        return [(c, pools[c.dst_rank]) for c in copies_from(plan, rank)]

    def check(self, peer: KVDestination) -> None:
        for _, pool in self._copies(peer):
            heads = pool.kv_heads[1] - pool.kv_heads[0]
            if pool.block_bytes * len(self.kv_heads) != self.block_bytes * heads:
                raise TransferError(f"KV block size differs: here {self.block_bytes} bytes for {len(self.kv_heads)} "
                                    f"KV heads, peer {pool.block_bytes} for {heads}; prefill and decode engines need "
                                    "the same model, dtype and kv_block_size")

    def submit_layer(self, peer: KVDestination, layer: int, src_blocks: list[int], dst_blocks: list[int]):
        self.check(peer)
        batches, nbytes = [], 0
        runs = contiguous_runs(src_blocks, dst_blocks)
        for copy, pool in self._copies(peer):
            src_layer, dst_layer = self.base + layer * self.layer_stride, pool.base_address + layer * pool.layer_stride
            pieces = [(src_layer + s, dst_layer + d, n) for run in runs
                      for s, d, n in slot_pieces(copy, run, len(self.kv_heads), pool.kv_heads[1] - pool.kv_heads[0],
                                                 self.block_bytes, pool.block_bytes, self.slots)]
            batches += self._write(pool.session, pieces)
            nbytes += sum(n for _, _, n in pieces)
        return batches, nbytes

    def _write(self, session: str, pieces: list[tuple[int, int, int]]) -> list[_Batch]:
        out = []
        for i in range(0, len(pieces), MAX_SLICES_IN_FLIGHT):
            chunk = pieces[i:i + MAX_SLICES_IN_FLIGHT]
            while self.in_flight and sum(b.slices for b in self.in_flight) + len(chunk) > MAX_SLICES_IN_FLIGHT:
                self._settle(self.in_flight[:1])
            batch = self.engine.batch_transfer_async_write(session, [p[0] for p in chunk], [p[1] for p in chunk],
                                                           [p[2] for p in chunk])
            if batch <= 0:
                raise TransferError(f"Mooncake could not start a write to {session} (batch id {batch})")
            out.append(_Batch(batch, len(chunk)))
            self.in_flight.append(out[-1])
        return out

    def _settle(self, batches: list[_Batch]) -> None:
        # Mooncake polls until every batch has landed (the GIL released), then frees them.
        pending = [b for b in batches if b.landed is None]
        if pending:
            landed = self.engine.get_batch_transfer_status([b.batch_id for b in pending]) == 0
            for b in pending:
                b.landed = landed
            self.in_flight = [b for b in self.in_flight if b.landed is None]

    def wait(self, handles: list) -> None:
        batches = [b for handle in handles for b in handle]
        self._settle(batches)
        if not all(b.landed for b in batches):
            raise TransferError("a Mooncake write failed or timed out")


# Mooncake's TCP lanes refuse a batch once about 2048 slices are queued: a head-sliced write
# (one slice per slot) is cut into batches of at most this many, and waits for room.
MAX_SLICES_IN_FLIGHT = 1024


@dataclass
class _Batch:
    batch_id: int     # Mooncake reuses ids once a batch is settled: the object, not the id, is the handle
    slices: int
    landed: bool | None = None


def make_transport(kind: str, host: str) -> KVTransport | None:
    """kv_transport parameter: "none", "mooncake" (TCP) or "mooncake:<protocol>"."""
    if not kind or kind == "none":
        return None
    name, _, protocol = kind.partition(":")
    if name == "mooncake":
        return MooncakeTransport(host, protocol or "tcp")
    raise TransferError(f"kv_transport '{kind}' is unknown; use mooncake, mooncake:rdma or none")

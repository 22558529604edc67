"""The PD KV handoff, one object per side, with every failure rule in one place.

Modelled on vLLM v1's KVConnectorBase_V1 split: the engine thread asks these objects what to
do, the worker's asyncio side only carries RPCs and transfers. Both classes are pure logic
over request ids and clocks, so each rule is unit-tested without processes.

DECODE side (DecodeKVConnector): a request whose prompt a prefill engine computes

    QUEUED --blocks allocated--> RESERVED --take_dispatch--> DISPATCHED --answer ok--> DONE (the sequence decodes)
        |                          |--answer error--> FAILED (error to the client, blocks freed)
        |                          |--deadline+grace--> LATE (error to the client, blocks held)
        |                          '--abort--> LATE (blocks held)
        '--abort--> FAILED (blocks freed: nothing was sent, nobody writes); so does QUEUED
    LATE --any answer, or deadline+2*grace--> FAILED (blocks freed)

A prefill engine that is unreachable, died, or could not move the KV (its call ended, so it
writes nothing more) costs the request nothing: the decode engine frees the reserved blocks and
prefills the prompt itself. Any other error fails the request.

The rule behind LATE: a prefill engine may be writing into the reserved blocks until it
answers, so they are never reused before that; its own deadline check (PrefillKVConnector)
means it writes nothing after the deadline, so past deadline + 2*grace they are freed even if
the answer never comes. A late answer never admits a request: its client has already heard
an error, and no client ever gets tokens computed from another request's blocks.

PREFILL side (PrefillKVConnector): validates where the KV goes, and pushes it there layer by
layer while the prompt is computed: after each layer of a forward, that layer's KV of the
blocks the forward filled (and, with the first piece, of the prompt's blocks this engine had
cached) goes out as one asynchronous batch; the step ends by waiting for its batches. Blocks
the decode engine already holds are never written. Past the deadline nothing more is written.
"""
from __future__ import annotations

import bisect
import enum
import time
from dataclasses import dataclass, field

from pdserve.common.constants import KV_TRANSFER_BUCKETS
from pdserve.common.errors import Cause, ServeError
from pdserve.engine.kv_transport import KVDestination, KVTransport, TransferError

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 10.0


# Handoff failures after which nothing more is written into the reserved blocks and the prompt
# can simply be computed here: the peer is gone or unreachable, its step or its transfer failed.
RECOVERABLE = (None, Cause.KV_HANDOFF_PEER_LOST, Cause.KV_TRANSFER_ERROR, Cause.ENGINE_FAILURE)


class HandoffState(enum.Enum):
    QUEUED = "queued"            # waiting for blocks like any new request
    RESERVED = "reserved"        # blocks allocated; the prefill engine has not been asked yet
    DISPATCHED = "dispatched"    # the prefill engine computes and may write into the blocks
    DONE = "done"                # the KV landed; the sequence decodes like any other
    FAILED = "failed"            # ended; the blocks are free
    LATE = "late"                # ended for the client, but the blocks wait for the prefill engine's answer


class Action(enum.Enum):
    """What the engine does with the sequence after an event."""
    ADMIT = "admit"              # append the first token and decode
    PREFILL_HERE = "prefill_here"  # free the reserved blocks; the sequence is prefilled locally
    FAIL = "fail"                # end the request with the error and free its blocks
    FAIL_HOLD = "fail_hold"      # end the request with the error, keep its blocks reserved
    HOLD = "hold"                # end the request silently (aborted), keep its blocks reserved
    FREE = "free"                # end the request silently (if not ended yet) and free its blocks
    NONE = "none"                # nothing to do (unknown or already settled request)


@dataclass
class Handoff:
    request_id: str
    prefill_address: str
    state: HandoffState = HandoffState.QUEUED
    block_ids: list[int] = field(default_factory=list)
    held_blocks: int = 0         # leading blocks this engine's prefix cache already filled
    deadline: float = 0.0        # time.time() after which the prefill engine must not write


@dataclass(frozen=True)
class Decision:
    action: Action
    error: ServeError | None = None


class DecodeKVConnector:
    """The DECODE engine's side: which requests wait for remote KV and what each event means."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, grace_s: float = DEFAULT_GRACE_S, clock=time.time):
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.clock = clock
        self.handoffs: dict[str, Handoff] = {}
        self._to_dispatch: list[Handoff] = []

    # ---- scheduler side ------------------------------------------------------------------
    def expect(self, request_id: str, prefill_address: str) -> None:
        """A new request whose prompt the engine at prefill_address computes."""
        self.handoffs[request_id] = Handoff(request_id, prefill_address)

    def awaits_remote_kv(self, request_id: str) -> bool:
        """Whether admitting the request means reserving blocks instead of prefilling it here."""
        handoff = self.handoffs.get(request_id)
        return handoff is not None and handoff.state == HandoffState.QUEUED

    def reserved(self, request_id: str, block_ids: list[int], num_cached_tokens: int = 0,
                 block_size: int = 1) -> None:
        """The scheduler allocated the prompt's blocks, the first num_cached_tokens of which the
        prefix cache already holds (whole blocks, never written by the prefill engine): the
        handoff can be dispatched."""
        handoff = self.handoffs[request_id]
        handoff.state = HandoffState.RESERVED
        handoff.block_ids = list(block_ids)
        handoff.held_blocks = num_cached_tokens // block_size
        self._to_dispatch.append(handoff)

    def take_dispatch(self) -> list[Handoff]:
        """Handoffs to send to their prefill engines now (RESERVED -> DISPATCHED)."""
        out = [h for h in self._to_dispatch if h.state == HandoffState.RESERVED]
        self._to_dispatch = []
        now = self.clock()
        for handoff in out:
            handoff.state = HandoffState.DISPATCHED
            handoff.deadline = now + self.timeout_s
        return out

    @property
    def num_open(self) -> int:
        """Handoffs that hold blocks without decoding (reserved, dispatched or late)."""
        return sum(h.state in (HandoffState.RESERVED, HandoffState.DISPATCHED, HandoffState.LATE)
                   for h in self.handoffs.values())

    # ---- events ------------------------------------------------------------------------------
    def on_answer(self, request_id: str, first_token: int | None, cause: Cause | None = None,
                  message: str = "") -> Decision:
        """The prefill engine answered: a first token (its KV is in place) or an error."""
        handoff = self.handoffs.get(request_id)
        if handoff is None:
            return Decision(Action.NONE)
        if handoff.state == HandoffState.DISPATCHED:
            if first_token is not None:
                handoff.state = HandoffState.DONE
                del self.handoffs[request_id]
                return Decision(Action.ADMIT)
            self._close(handoff)
            if cause in RECOVERABLE:
                return Decision(Action.PREFILL_HERE)
            return Decision(Action.FAIL, ServeError(
                cause or Cause.KV_HANDOFF_PEER_LOST,
                f"KV handoff failed: prefill engine {handoff.prefill_address}: {message}; retry the request"))
        if handoff.state == HandoffState.LATE:
            self._close(handoff)
            return Decision(Action.FREE)
        return Decision(Action.NONE)

    def on_abort(self, request_id: str) -> Decision:
        """The client went away (cancel, deadline, disconnect)."""
        handoff = self.handoffs.get(request_id)
        if handoff is None:
            return Decision(Action.NONE)
        if handoff.state in (HandoffState.QUEUED, HandoffState.RESERVED):
            self._close(handoff)     # never sent: nobody writes into its blocks
            return Decision(Action.FREE)
        if handoff.state == HandoffState.DISPATCHED:
            handoff.state = HandoffState.LATE
            return Decision(Action.HOLD)
        return Decision(Action.NONE)

    def expire(self) -> list[tuple[str, Decision]]:
        """Deadlines: a dispatched handoff unanswered at deadline + grace fails its request
        (blocks held); a late one unanswered at deadline + 2 * grace frees its blocks."""
        now = self.clock()
        out = []
        for handoff in list(self.handoffs.values()):
            if handoff.state == HandoffState.DISPATCHED and now > handoff.deadline + self.grace_s:
                handoff.state = HandoffState.LATE
                out.append((handoff.request_id, Decision(Action.FAIL_HOLD, ServeError(
                    Cause.KV_HANDOFF_TIMEOUT,
                    f"KV handoff failed: prefill engine {handoff.prefill_address} did not answer within "
                    f"{self.timeout_s + self.grace_s:.0f} s; retry the request"))))
            elif handoff.state == HandoffState.LATE and now > handoff.deadline + 2 * self.grace_s:
                self._close(handoff)
                out.append((handoff.request_id, Decision(Action.FREE)))
        return out

    def _close(self, handoff: Handoff) -> None:
        handoff.state = HandoffState.FAILED
        self.handoffs.pop(handoff.request_id, None)


@dataclass
class TransferStats:
    count: int = 0
    failures: int = 0
    seconds: float = 0.0
    bytes: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(KV_TRANSFER_BUCKETS))

    def observe(self, seconds: float, nbytes: int) -> None:
        self.count += 1
        self.seconds += seconds
        self.bytes += nbytes
        for i in range(bisect.bisect_left(KV_TRANSFER_BUCKETS, seconds), len(self.buckets)):
            self.buckets[i] += 1


@dataclass
class PendingSend:
    destination: KVDestination
    deadline: float
    next_block: int                  # the first block not yet pushed in full
    handles: list = field(default_factory=list)   # this step's batches
    bytes: int = 0
    wait_seconds: float = 0.0        # time the steps waited for this request's writes
    error: ServeError | None = None


class LayerPush:
    """The pushes of one forward, called by the model after each layer (AttentionMetadata.after_layer)."""

    def __init__(self, transport: KVTransport, pieces: list[tuple[PendingSend, list[int], list[int]]]):
        self.transport = transport
        self.pieces = pieces

    def __call__(self, layer: int) -> None:
        transport = self.transport
        for pending, src, dst in self.pieces:
            if pending.error is not None:
                continue
            try:
                handle, nbytes = transport.submit_layer(pending.destination, layer, src, dst)
            except Exception as exc:
                pending.error = ServeError(Cause.KV_TRANSFER_ERROR, f"{type(exc).__name__}: {exc}")
                continue
            pending.handles.append(handle)
            pending.bytes += nbytes

    # ---- tensor parallelism: every rank pushes the heads it holds of the same blocks ------------
    def plan(self) -> list[tuple[KVDestination, list[int], list[int]]]:
        """What the other ranks push of this forward (rank 0 broadcasts it with the step)."""
        return [(pending.destination, src, dst) for pending, src, dst in self.pieces]

    def settle(self) -> list[tuple[str, int]]:
        """Another rank, after the forward: waits for its writes; per piece, its error ("" if
        none) and bytes, for rank 0 (merge)."""
        out = []
        for pending, _, _ in self.pieces:
            try:
                self.transport.wait(pending.handles)
            except Exception as exc:
                pending.error = pending.error or ServeError(Cause.KV_TRANSFER_ERROR, f"{type(exc).__name__}: {exc}")
            out.append((pending.error.message if pending.error else "", pending.bytes))
        return out

    def merge(self, reports: list[list[tuple[str, int]]]) -> None:
        """Rank 0: the other ranks' outcomes (settle) count as this request's: its handoff is
        whole only when every rank's heads landed."""
        for report in reports:
            for (pending, _, _), (error, nbytes) in zip(self.pieces, report):
                pending.bytes += nbytes
                if error and pending.error is None:
                    pending.error = ServeError(Cause.KV_TRANSFER_ERROR, f"another rank's write: {error}")


class PrefillKVConnector:
    """The PREFILL engine's side: where each prompt's KV goes, and the layer-wise push."""

    def __init__(self, transport: KVTransport, block_size: int, clock=time.time):
        self.transport = transport
        self.block_size = block_size
        self.clock = clock
        self.pending: dict[str, PendingSend] = {}
        self.stats = TransferStats()

    def accept(self, request_id: str, num_prompt_tokens: int, destination: KVDestination, deadline: float) -> None:
        """Checks a Prefill request's destination before any work is done for it."""
        needed = -(-num_prompt_tokens // self.block_size)
        if len(destination.block_ids) != needed:
            raise ServeError(Cause.INVALID_ARGUMENT,
                             f"the destination has {len(destination.block_ids)} blocks for {num_prompt_tokens} "
                             "prompt tokens; both engines need the same kv_block_size")
        if destination.held_blocks * self.block_size >= num_prompt_tokens:
            raise ServeError(Cause.INVALID_ARGUMENT,
                             f"the destination holds {destination.held_blocks} blocks of a {num_prompt_tokens}-token "
                             "prompt already; at least its last token's block must be written")
        try:
            self.transport.check(destination)
        except TransferError as exc:
            raise ServeError(Cause.INVALID_ARGUMENT, str(exc)) from exc
        self.pending[request_id] = PendingSend(destination, deadline, next_block=destination.held_blocks)

    def sends(self, request_id: str) -> bool:
        return request_id in self.pending

    def forget(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def layer_push(self, pieces: list[tuple[str, list[int], int]]) -> LayerPush | None:
        """For a forward computing prompt tokens up to `end` of these (request id, block table,
        end): the blocks to push after each layer, or None if none of them is handed off."""
        planned = []
        now = self.clock()
        for request_id, block_table, end in pieces:
            pending = self.pending.get(request_id)
            if pending is None or pending.error is not None:
                continue
            if now > pending.deadline:
                pending.error = ServeError(Cause.KV_HANDOFF_TIMEOUT,
                                           "the handoff deadline passed while the prompt was computed; "
                                           "nothing more was written")
                continue
            first, last = pending.next_block, (end - 1) // self.block_size
            pending.next_block = end // self.block_size    # a partial last block goes again with the next piece
            if first <= last:
                planned.append((pending, block_table[first:last + 1],
                                list(pending.destination.block_ids[first:last + 1])))
        return LayerPush(self.transport, planned) if planned else None

    def end_step(self) -> list[tuple[str, ServeError]]:
        """Waits for the step's writes; returns the requests whose handoff failed (to end now)."""
        failed = []
        for request_id, pending in list(self.pending.items()):
            if pending.handles:
                start = time.perf_counter()
                try:
                    self.transport.wait(pending.handles)
                except Exception as exc:
                    pending.error = pending.error or ServeError(Cause.KV_TRANSFER_ERROR, f"{type(exc).__name__}: {exc}")
                pending.handles = []
                pending.wait_seconds += time.perf_counter() - start
            if pending.error is not None:
                self.stats.failures += 1
                del self.pending[request_id]
                failed.append((request_id, pending.error))
        return failed

    def finish(self, request_id: str) -> tuple[float, int]:
        """The prompt's last piece has landed (end_step ran): the handoff is complete. Returns
        (seconds the steps waited for its writes, bytes)."""
        pending = self.pending.pop(request_id)
        self.stats.observe(pending.wait_seconds, pending.bytes)
        return pending.wait_seconds, pending.bytes

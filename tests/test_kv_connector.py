"""The KV handoff's failure rules, each on its own, without processes (engine/kv_connector.py)."""
import pytest

from pdserve.common.errors import Cause, ServeError
from pdserve.engine.kv_connector import Action, DecodeKVConnector, HandoffState, PrefillKVConnector
from pdserve.engine.kv_transport import KVDestination, KVTransport


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dispatched(clock=None, timeout=60.0, grace=10.0) -> DecodeKVConnector:
    """A connector with request 'r' dispatched to prefill engine p:1 at clock time 1000."""
    c = DecodeKVConnector(timeout, grace, clock=clock or Clock())
    c.expect("r", "p:1")
    c.reserved("r", [3, 4])
    [h] = c.take_dispatch()
    assert (h.request_id, h.block_ids, h.state) == ("r", [3, 4], HandoffState.DISPATCHED)
    return c


def test_life_of_a_good_handoff():
    c = DecodeKVConnector(clock=Clock())
    c.expect("r", "p:1")
    assert c.awaits_remote_kv("r") and c.handoffs["r"].state == HandoffState.QUEUED
    c.reserved("r", [7])
    assert not c.awaits_remote_kv("r") and c.handoffs["r"].state == HandoffState.RESERVED
    assert c.num_open == 1
    [h] = c.take_dispatch()
    assert h.deadline == 1000.0 + c.timeout_s
    assert c.take_dispatch() == []                      # dispatched once
    assert c.on_answer("r", 42).action == Action.ADMIT
    assert "r" not in c.handoffs and c.num_open == 0
    assert not c.awaits_remote_kv("r")                  # a preempted sequence recomputes locally


@pytest.mark.parametrize("cause", [None, Cause.KV_HANDOFF_PEER_LOST, Cause.KV_TRANSFER_ERROR, Cause.ENGINE_FAILURE])
def test_a_lost_or_failed_prefill_engine_means_prefilling_here(cause):
    c = dispatched()
    d = c.on_answer("r", None, cause, "UNAVAILABLE: connection refused")
    assert d.action == Action.PREFILL_HERE and d.error is None
    assert c.num_open == 0 and not c.awaits_remote_kv("r")   # from now on an ordinary local request


@pytest.mark.parametrize("cause", [Cause.KV_HANDOFF_TIMEOUT, Cause.INVALID_ARGUMENT])
def test_other_prefill_errors_fail_the_request_and_free_blocks(cause):
    c = dispatched()
    d = c.on_answer("r", None, cause, "the handoff deadline passed")
    assert d.action == Action.FAIL and d.error.cause == cause
    assert "KV handoff failed" in d.error.message and "p:1" in d.error.message
    assert c.num_open == 0


def test_deadline_fails_the_request_but_holds_blocks_until_the_answer():
    clock = Clock()
    c = dispatched(clock)
    clock.now += 60 + 10 - 1
    assert c.expire() == []                              # inside deadline + grace
    clock.now += 2
    [(rid, d)] = c.expire()
    assert rid == "r" and d.action == Action.FAIL_HOLD and d.error.cause == Cause.KV_HANDOFF_TIMEOUT
    assert c.handoffs["r"].state == HandoffState.LATE and c.num_open == 1
    assert c.expire() == []                              # reported once
    # A late first token never admits: the client already heard an error.
    assert c.on_answer("r", 42).action == Action.FREE
    assert c.num_open == 0 and c.on_answer("r", 42).action == Action.NONE


def test_late_blocks_are_freed_when_the_answer_never_comes():
    clock = Clock()
    c = dispatched(clock)
    clock.now += 60 + 10 + 1
    assert c.expire()[0][1].action == Action.FAIL_HOLD
    clock.now += 10 - 2
    assert c.expire() == []                              # deadline + 2 * grace not reached
    clock.now += 2
    [(rid, d)] = c.expire()
    assert d.action == Action.FREE and c.num_open == 0


def test_abort_before_dispatch_frees_at_once():
    c = DecodeKVConnector(clock=Clock())
    c.expect("q", "p:1")
    assert c.on_abort("q").action == Action.FREE       # still queued: no blocks, nobody writes
    c.expect("r", "p:1")
    c.reserved("r", [1])
    assert c.on_abort("r").action == Action.FREE       # reserved, never sent
    assert c.take_dispatch() == [] and c.num_open == 0


def test_abort_during_transfer_holds_blocks_until_the_answer():
    c = dispatched()
    assert c.on_abort("r").action == Action.HOLD
    assert c.handoffs["r"].state == HandoffState.LATE
    assert c.on_abort("r").action == Action.NONE       # a second abort changes nothing
    assert c.on_answer("r", 5).action == Action.FREE   # written or not, the blocks go back now
    assert c.num_open == 0


def test_answers_for_unknown_requests_are_ignored():
    c = DecodeKVConnector(clock=Clock())
    assert c.on_answer("nobody", 1).action == Action.NONE
    assert c.on_abort("nobody").action == Action.NONE


class RecordingTransport(KVTransport):
    """Records every layer batch; wait() fails when asked to."""
    name = "recording"

    def __init__(self, fail_submit: bool = False, fail_wait: bool = False):
        self.fail_submit, self.fail_wait = fail_submit, fail_wait
        self.writes = []

    def register_pool(self, pool) -> None:
        pass

    def handshake(self) -> dict:
        return {}

    def submit_layer(self, peer, layer, src_blocks, dst_blocks):
        if self.fail_submit:
            raise RuntimeError("peer refused")
        self.writes.append((peer.session, layer, list(src_blocks), list(dst_blocks)))
        return len(self.writes), 100 * len(src_blocks)

    def wait(self, handles) -> None:
        if self.fail_wait:
            raise RuntimeError("link down")


def destination(blocks, held: int = 0) -> KVDestination:
    return KVDestination("recording", "tcp", "d:1", 0, 100, tuple(blocks), held_blocks=held)


def forward(p: PrefillKVConnector, pieces, layers: int = 2):
    """What a forward does: after each layer, the push; then the step's end."""
    push = p.layer_push(pieces)
    for layer in range(layers if push else 0):
        push(layer)
    return p.end_step()


def test_prefill_side_checks_the_destination_and_pushes_each_layer_as_it_is_computed():
    clock = Clock()
    p = PrefillKVConnector(RecordingTransport(), block_size=4, clock=clock)
    with pytest.raises(ServeError) as info:
        p.accept("r", 9, destination([1, 2]), deadline=2000.0)   # 9 tokens need 3 blocks
    assert info.value.cause == Cause.INVALID_ARGUMENT and "kv_block_size" in info.value.message
    with pytest.raises(ServeError) as info:
        p.accept("r", 8, destination([1, 2], held=2), deadline=2000.0)   # nothing left to write
    assert info.value.cause == Cause.INVALID_ARGUMENT
    p.accept("r", 9, destination([5, 6, 7]), deadline=2000.0)
    assert p.sends("r")
    # first piece: tokens 0-5 (blocks 0 and 1, the second partial), both layers
    assert forward(p, [("r", [0, 1, 2], 6)]) == []
    assert p.transport.writes == [("d:1", 0, [0, 1], [5, 6]), ("d:1", 1, [0, 1], [5, 6])]
    p.transport.writes.clear()
    # last piece: tokens 6-8: block 1 again (now full) and block 2
    assert forward(p, [("r", [0, 1, 2], 9)]) == []
    assert p.transport.writes == [("d:1", 0, [1, 2], [6, 7]), ("d:1", 1, [1, 2], [6, 7])]
    seconds, nbytes = p.finish("r")
    assert nbytes == 2 * 200 + 2 * 200 and not p.sends("r") and p.stats.count == 1


def test_prefill_side_skips_the_blocks_the_decode_engine_holds():
    p = PrefillKVConnector(RecordingTransport(), block_size=4, clock=Clock())
    p.accept("r", 10, destination([5, 6, 7], held=2), deadline=2000.0)
    forward(p, [("r", [0, 1, 2], 10)], layers=1)
    assert p.transport.writes == [("d:1", 0, [2], [7])]


def test_prefill_side_writes_nothing_after_the_deadline():
    clock = Clock()
    p = PrefillKVConnector(RecordingTransport(), block_size=4, clock=clock)
    p.accept("r", 8, destination([5, 6]), deadline=clock.now + 1)
    assert forward(p, [("r", [0, 1], 4)]) == []
    clock.now += 2
    writes = len(p.transport.writes)
    [(request_id, error)] = forward(p, [("r", [0, 1], 8)])
    assert request_id == "r" and error.cause == Cause.KV_HANDOFF_TIMEOUT
    assert len(p.transport.writes) == writes and p.stats.failures == 1 and not p.sends("r")


@pytest.mark.parametrize("where", ["submit", "wait"])
def test_prefill_side_transfer_failure_has_its_cause(where):
    p = PrefillKVConnector(RecordingTransport(fail_submit=where == "submit", fail_wait=where == "wait"),
                           block_size=4, clock=Clock())
    p.accept("r", 4, destination([5]), deadline=2000.0)
    [(request_id, error)] = forward(p, [("r", [0], 4)])
    assert error.cause == Cause.KV_TRANSFER_ERROR and ("peer refused" in error.message or "link down" in error.message)
    assert p.stats.failures == 1 and not p.sends("r")


PREFILL_PEER = """
import asyncio, grpc
from pdserve._proto import engine_pb2_grpc

class Peer(engine_pb2_grpc.EngineServicer):
    async def Prefill(self, request, context):
        if request.request_id == "unreachable":   # as a call that finds the engine gone sees it
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        print(request.request_id, flush=True)       # the test reads that the call is in flight
        await asyncio.sleep(600)                    # and it stays in flight

async def main():
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServicer_to_server(Peer(), server)
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""


def test_every_handoff_in_flight_gets_an_answer_when_its_channel_is_closed():
    """Prefill calls to one engine share a channel; the first that finds the engine unreachable
    closes it, which cancels the calls still in flight on it. Each of those must still tell the
    engine (which then prefills locally) instead of vanishing and leaving its request waiting
    for the handoff deadline (a PREFILL kill under load lost 3 of 4 streams this way)."""
    import asyncio
    import subprocess
    import sys
    import time

    from pdserve._proto import engine_pb2
    from pdserve.engine.worker import PrefillPeers

    class Inbox:   # the engine loop's side of PrefillPeers: what it is told
        def __init__(self):
            self.answers: asyncio.Queue = asyncio.Queue()

        def send(self, command):
            self.answers.put_nowait(command)

    peer = subprocess.Popen([sys.executable, "-c", PREFILL_PEER], stdout=subprocess.PIPE, text=True)

    async def run() -> list:
        inbox = Inbox()
        peers = PrefillPeers(inbox)
        address = f"127.0.0.1:{peer.stdout.readline().strip()}"
        deadline = time.time() + 60
        peers.dispatch([(address, engine_pb2.PrefillRequest(request_id=f"r{i}", deadline=deadline)) for i in range(3)])
        in_flight = [await asyncio.wait_for(asyncio.to_thread(peer.stdout.readline), 30) for _ in range(3)]
        assert sorted(line.strip() for line in in_flight) == ["r0", "r1", "r2"]   # on the one channel
        peers.dispatch([(address, engine_pb2.PrefillRequest(request_id="unreachable", deadline=deadline))])
        answers = [await asyncio.wait_for(inbox.answers.get(), 10) for _ in range(4)]
        await peers.close()
        return answers

    try:
        answers = asyncio.run(run())
    finally:
        peer.kill()
        peer.wait()
    assert sorted(a.request_id for a in answers) == ["r0", "r1", "r2", "unreachable"]
    assert all(a.first_token is None and a.cause == Cause.KV_HANDOFF_PEER_LOST for a in answers), answers

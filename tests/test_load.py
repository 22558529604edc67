"""The load plane (cluster/load.py) without processes: the fresh-load arithmetic, the KV index
fed from Stats answers, engines forgotten, load listeners, and Stats calls through a client
whose stub is a fake (late answers, failures, the poll loop)."""
import asyncio

import grpc
import pytest

from pdserve._proto import engine_pb2
from pdserve.cluster.load import REQUEST_TOKENS, SUSPECT_PENALTY, FreshLoad, LoadPlane, answer_load
from pdserve.common.block_hash import block_hashes
from pdserve.engine.kv_events import KVEventLog

BLOCK = 16


def stats(waiting=0, awaiting=0, running=0, free=100, total=100, prefill_tokens=0, **kv):
    return engine_pb2.StatsResponse(num_waiting=waiting, num_awaiting_kv=awaiting, num_running=running,
                                    num_free_blocks=free, num_total_blocks=total,
                                    waiting_prefill_tokens=prefill_tokens, **kv)


def hashes(seed: int, n: int = 1500) -> list[int]:
    return block_hashes([(seed * 7919 + i * 31) % 8192 for i in range(n)], BLOCK)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plane_with_listener(**kw):
    plane, heard = LoadPlane(**kw), []
    plane.listen(lambda address, load: heard.append((address, load)))
    return plane, heard


# ---- the arithmetic ----

def test_an_answer_counts_queued_tokens_requests_and_breaks_ties_on_kv_use():
    assert answer_load(stats(prefill_tokens=700, running=2, waiting=1, awaiting=1)) == 700 + 4 * REQUEST_TOKENS
    assert 0 < answer_load(stats(free=50)) < 1   # half the blocks in use: less than a token
    assert answer_load(stats(total=0, free=0)) == 0


def test_fresh_load_is_what_was_sent_since_the_answer_counted_it():
    load = FreshLoad()
    load.sent(300)
    load.sent(0)
    assert (load.fresh_tokens, load.fresh_requests, load.load) == (300, 2, 300 + 2 * REQUEST_TOKENS)
    before = (load.sent_tokens, load.sent_requests)   # a Stats call goes out ...
    load.sent(50)                                     # ... a request goes before it answers
    load.answered(stats(prefill_tokens=300, running=1, waiting=1), asked_at=5.0, sent_before=before)
    assert (load.fresh_tokens, load.fresh_requests) == (50, 1)
    assert load.load == 300 + 2 * REQUEST_TOKENS + 50 + REQUEST_TOKENS


def test_an_ended_request_leaves_the_fresh_load_or_the_answer_that_counted_it():
    load = FreshLoad()
    load.answered(stats(prefill_tokens=200, running=1), asked_at=1.0)
    load.sent(1000)
    load.finished(1000, sent_at=2.0)          # sent after the answer's call: it was fresh load
    assert load.fresh_tokens == load.fresh_requests == 0 and load.load == 200 + REQUEST_TOKENS
    load.sent(400)
    load.answered(stats(prefill_tokens=600, running=2), asked_at=4.0)   # counts it (and the 200)
    load.finished(400, sent_at=3.0)            # sent before that call: the answer counted it
    assert load.load == 200 + REQUEST_TOKENS and load.answer_waiting == 200
    load.finished(5000, sent_at=3.0)           # never below zero
    assert load.load == 0 and load.answer_waiting == 0


# ---- the plane: loads and listeners ----

def test_fresh_load_counts_decode_requests_and_what_a_stats_answer_has_not_seen():
    plane, heard = plane_with_listener()
    plane.observe("d:1", stats(running=2))
    assert plane.load_of("d:1") == 2 * REQUEST_TOKENS and heard == [("d:1", 2 * REQUEST_TOKENS)]
    plane.sent("d:1", 0)
    plane.sent("d:1", 0)
    assert plane.load_of("d:1") == 4 * REQUEST_TOKENS and heard[-1] == ("d:1", 4 * REQUEST_TOKENS)
    fresh = plane.figures("d:1").fresh
    sent_before = (fresh.sent_tokens, fresh.sent_requests)   # a Stats call goes out ...
    plane.sent("d:1", 300)                                   # ... a request goes before it answers
    plane.observe("d:1", stats(running=4), sent_before)
    assert (fresh.fresh_tokens, fresh.fresh_requests) == (300, 1)
    assert plane.load_of("d:1") == 300 + 5 * REQUEST_TOKENS == heard[-1][1]
    assert plane.load_of("unknown:1") == 0 and plane.last_stats("unknown:1") is None


def test_an_ended_request_leaves_the_load_that_the_last_stats_answer_counted():
    clock = Clock()
    plane = LoadPlane(clock=clock)
    plane.sent("p:1", 1000)
    sent_at = plane.clock()
    clock.now += 0.5
    plane.observe("p:1", stats(prefill_tokens=900, running=1))   # asked after the send: it counts the request
    assert plane.load_of("p:1") == 900 + REQUEST_TOKENS
    assert plane.figures("p:1").last_stats_at == clock.now
    plane.finished("p:1", 1000, sent_at)                          # done before the next answer
    assert plane.load_of("p:1") < 1


def test_a_suspect_engine_carries_the_penalty_until_it_answers_again():
    plane, heard = plane_with_listener()
    plane.observe("e:1", stats(running=1))
    client = plane.get("e:1")
    client.suspect = True
    assert client.suspect and heard[-1] == ("e:1", REQUEST_TOKENS + SUSPECT_PENALTY)
    client.suspect = True                       # no change: no notification
    assert len(heard) == 2
    plane.observe("e:1", stats())
    assert not client.suspect and heard[-1] == ("e:1", 0)


def test_a_forgotten_engine_reads_zero_and_late_reports_change_nothing():
    plane, heard = plane_with_listener()
    held = hashes(1)
    plane.observe("a:1", stats(running=3, kv_event_id=4, kv_events_reset=True, stored_block_hashes=held[:5]))
    client = plane.get("a:1")
    asyncio.run(plane.drop("a:1"))             # the engine stopped
    assert heard[-1] == ("a:1", 0.0) and plane.kv_index.match(held) == {} and plane.last_stats("a:1") is None
    client.suspect = True                       # a request on its old client failed meanwhile
    assert heard[-1] == ("a:1", 0.0) and plane.peek("a:1") is None


# ---- the KV index, fed from the answers ----

def _kv(batch) -> dict:
    return dict(kv_event_id=batch.event_id, kv_events_reset=batch.reset,
                stored_block_hashes=batch.stored, removed_block_hashes=batch.removed)


def test_kv_events_from_the_engine_log_keep_the_index_equal_to_the_engine_cache():
    log = KVEventLog(max_events=8)
    plane = LoadPlane()

    def poll():
        plane.observe("e:1", stats(**_kv(log.since(plane.figures("e:1").kv_cursor))))

    held = hashes(3)
    for h in held[:5]:
        log.stored(h)
    poll()                                      # cursor 0: the whole set
    assert plane.kv_index.match(held) == {"e:1": 5}
    log.removed(held[4])
    log.stored(held[5])
    log.removed(held[5])
    poll()                                      # the net change since the cursor
    assert plane.kv_index.match(held) == {"e:1": 4} and plane.kv_index.blocks("e:1") == 4
    for h in held[10:30]:                       # more events than the log keeps: a reset
        log.stored(h)
    log.removed(held[0])
    poll()
    assert plane.kv_index.match(held) == {} and plane.kv_index.blocks("e:1") == 23


def test_an_engine_that_leaves_or_is_replaced_is_forgotten():
    plane = LoadPlane()
    held = hashes(8)
    for address in ("a:1", "b:1"):
        plane.observe(address, stats(kv_event_id=7, kv_events_reset=True, stored_block_hashes=held[:3]))
    plane.sync({"a:1": "inc1", "b:1": "inc1"})   # the first look: their views are of these engines
    plane.sync({"a:1": "inc1", "b:1": "inc1"})
    assert plane.kv_index.match(held) == {"a:1": 3, "b:1": 3} and plane.figures("a:1").kv_cursor == 7
    plane.sync({"a:1": "inc2", "b:1": "inc1"})   # a new process at a's address
    assert plane.kv_index.match(held) == {"b:1": 3} and plane.figures("a:1").kv_cursor == 0
    plane.sync({"a:1": "inc2"})                  # b left the registry
    assert plane.kv_index.match(held) == {}


# ---- Stats calls through the clients ----

class FakeStub:
    """An engine's Stats: each call waits until the test answers it (or fails it)."""

    def __init__(self):
        self.requests: list[engine_pb2.StatsRequest] = []
        self.pending: list[asyncio.Future] = []

    async def Stats(self, request, timeout=None, metadata=None):
        self.requests.append(request)
        self.pending.append(asyncio.get_running_loop().create_future())
        return await self.pending[-1]


def fake(plane: LoadPlane, address: str) -> FakeStub:
    stub = plane.get(address)._stub = FakeStub()
    return stub


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_stats_calls_ask_from_the_cursor_and_a_late_answer_changes_nothing():
    async def scenario():
        plane = LoadPlane()
        stub, client = fake(plane, "e:1"), plane.get("e:1")
        held = hashes(2)
        first = asyncio.ensure_future(client.stats())
        await settle()
        stub.pending[0].set_result(stats(running=1, kv_event_id=3, kv_events_reset=True,
                                         stored_block_hashes=held[:4]))
        await first
        assert stub.requests[0].kv_events_after == 0 and plane.figures("e:1").kv_cursor == 3
        older, newer = asyncio.ensure_future(client.stats()), None
        await settle()
        newer = asyncio.ensure_future(client.stats())
        await settle()
        assert [r.kv_events_after for r in stub.requests[1:]] == [3, 3]
        stub.pending[2].set_result(stats(running=5, kv_event_id=4, stored_block_hashes=held[4:6]))
        await newer
        stub.pending[1].set_result(stats(running=2, kv_event_id=5, removed_block_hashes=held[:4]))
        assert (await older).num_running == 2          # its caller still gets it ...
        assert plane.load_of("e:1") == 5 * REQUEST_TOKENS   # ... the plane keeps the newer answer
        assert plane.kv_index.match(held) == {"e:1": 6} and plane.figures("e:1").kv_cursor == 4
    asyncio.run(scenario())


def test_an_answer_from_before_the_view_started_over_keeps_its_load_but_not_its_kv():
    async def scenario():
        plane = LoadPlane()
        stub, client = fake(plane, "e:1"), plane.get("e:1")
        plane.sync({"e:1": "inc1"})
        call = asyncio.ensure_future(client.stats())
        await settle()
        plane.sync({"e:1": "inc2"})                    # a new process at the address
        stub.pending[0].set_result(stats(running=1, kv_event_id=9, kv_events_reset=True,
                                         stored_block_hashes=hashes(5)[:3]))
        await call
        assert plane.load_of("e:1") == REQUEST_TOKENS and plane.kv_index.engines() == []
        assert plane.figures("e:1").kv_cursor == 0     # the next call asks for the whole set
    asyncio.run(scenario())


def test_a_failed_stats_call_makes_the_engine_suspect():
    async def scenario():
        plane, heard = plane_with_listener()
        stub, client = fake(plane, "e:1"), plane.get("e:1")
        call = asyncio.ensure_future(client.stats())
        await settle()
        stub.pending[0].set_exception(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                                           grpc.aio.Metadata(), "connection refused"))
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert client.suspect and heard[-1] == ("e:1", SUSPECT_PENALTY)
    asyncio.run(scenario())


def test_the_poll_asks_every_engine_named_each_round_until_stopped():
    async def scenario():
        plane = LoadPlane(poll_s=0.01)
        stubs = {a: fake(plane, a) for a in ("a:1", "b:1")}
        named = ["a:1", "b:1"]
        plane.start(lambda: named)
        await settle()
        for address, stub in stubs.items():
            stub.pending[0].set_result(stats(running=1 if address == "a:1" else 2))
        await settle()
        assert plane.last_stats("a:1").num_running == 1 and plane.load_of("b:1") == 2 * REQUEST_TOKENS
        named.remove("b:1")
        await asyncio.sleep(0.05)
        assert len(stubs["a:1"].requests) == 2 and len(stubs["b:1"].requests) == 1
        await plane.close()
        assert plane.peek("a:1") is None and plane.last_stats("a:1") is None
    asyncio.run(scenario())

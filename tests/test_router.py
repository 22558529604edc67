"""Routing policies and the router's choices, over records made in memory (no processes, no etcd):
round_robin, least_load, kv_aware, fresh load as the router counts it, and the KV index
(the load plane itself: tests/test_load.py)."""
from collections import Counter

import pytest

from pdserve._proto import engine_pb2
from pdserve.cluster.kv_index import KVIndex
from pdserve.cluster.load import LoadPlane
from pdserve.cluster.router import Router
from pdserve.common.block_hash import block_hashes
from pdserve.common.errors import Cause, ServeError
from pdserve.common.records import READY, EngineRecord

BLOCK = 16


def record(instance_id: str, role: str, model: str = "m", state: str = READY) -> EngineRecord:
    return EngineRecord(instance_id=instance_id, model=model, version="1", role=role, device="cpu", node="n",
                        address=f"{instance_id}:1", state=state, capacity={"block_size": BLOCK})


class View:
    """What the router reads of a RegistryView: its records and their generation."""

    def __init__(self, records):
        self.records = {r.instance_id: r for r in records}
        self.generation = 0

    def add(self, r: EngineRecord) -> None:
        self.records[r.instance_id] = r
        self.generation += 1


def stats(waiting=0, awaiting=0, running=0, free=100, total=100, prefill_tokens=0, **kv):
    return engine_pb2.StatsResponse(num_waiting=waiting, num_awaiting_kv=awaiting, num_running=running,
                                    num_free_blocks=free, num_total_blocks=total,
                                    waiting_prefill_tokens=prefill_tokens, **kv)


def make_router(records, figures=None, policy="kv_aware", suspect=()):
    """A router over these records; figures: instance id -> its last Stats answer."""
    plane = LoadPlane()
    for instance_id, answer in (figures or {}).items():
        plane.observe(f"{instance_id}:1", answer)
    for instance_id in suspect:
        plane.get(f"{instance_id}:1").suspect = True
    return Router(View(records), plane, policy)


def hold(router: Router, instance_id: str, tokens: list[int]) -> None:
    """The engine reports (a KV event) that it holds the full blocks of these tokens."""
    router.plane.kv_index.apply(f"{instance_id}:1", block_hashes(tokens, BLOCK))


def fresh(router: Router, address: str) -> tuple[int, int]:
    """Prompt tokens and requests sent to the engine since its last Stats answer."""
    load = router.plane.figures(address).fresh
    return load.fresh_tokens, load.fresh_requests


def prompt(seed: int, n: int = 1500) -> list[int]:
    return [(seed * 7919 + i * 31) % 8192 for i in range(n)]


def choose(router, tokens=None, **kw):
    if tokens is None:
        return router.choose("m", "1", **kw)
    return router.choose("m", "1", prompt_tokens=len(tokens), prompt_hashes=block_hashes(tokens, BLOCK), **kw)


# ---- the policies without a prompt (round_robin, least_load, and kv_aware's fallback) ----

def test_round_robin_takes_turns_per_model_and_side():
    router = make_router([record("b", "BOTH"), record("a", "BOTH"), record("c", "BOTH"),
                          record("x", "BOTH", model="other"), record("y", "BOTH", model="other")], policy="round_robin")
    assert [choose(router).decode.instance_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert router.choose("other", "1").decode.instance_id == "x"   # its own turn counter
    assert choose(router, exclude=frozenset({"a"})).decode.instance_id == "b"   # a's turn, a excluded


def test_decode_engines_counts_the_ready_engines_that_generate_for_a_version():
    """What a front end divides a burst's announced requests by (GenerateRequest.admitting)."""
    router = make_router([record("a", "BOTH"), record("d", "DECODE"), record("p", "PREFILL"),
                          record("s", "BOTH", state="STARTING"), record("x", "BOTH", model="other")])
    assert router.decode_engines("m", "1") == 2
    assert router.decode_engines("other", "1") == 1 and router.decode_engines("none", "1") == 0


@pytest.mark.parametrize("policy", ["least_load", "kv_aware"])
def test_least_load_picks_the_lowest_and_spreads_ties(policy):
    router = make_router([record("a", "BOTH"), record("b", "BOTH"), record("c", "BOTH")],
                         {"a": stats(running=2), "b": stats(running=1), "c": stats(running=1)}, policy)
    picks = Counter()
    for _ in range(10):
        picks[choose(router).decode.instance_id] += 1   # not sent: no fresh load
    assert set(picks) == {"b", "c"} and picks["b"] == picks["c"] == 5


def test_router_pairs_a_decode_engine_with_the_least_loaded_prefill_engine():
    router = make_router([record("d", "DECODE"), record("p1", "PREFILL"), record("p2", "PREFILL")],
                         {"p1": stats(prefill_tokens=900), "p2": stats(prefill_tokens=100)})
    route = choose(router)
    assert route.decode.instance_id == "d" and route.prefill.instance_id == "p2"


def test_router_falls_back_to_local_prefill_and_never_pairs_both_engines():
    assert choose(make_router([record("d", "DECODE")])).prefill is None
    route = choose(make_router([record("b", "BOTH"), record("p", "PREFILL")]))
    assert route.decode.instance_id == "b" and route.prefill is None


def test_no_engine_is_a_typed_error_at_once():
    router = make_router([record("p", "PREFILL"), record("d", "DECODE", state="draining")])
    with pytest.raises(ServeError) as info:
        choose(router)
    assert info.value.cause == Cause.NO_ENGINE and "no live engine" in info.value.message


def test_in_flight_counts_steer_and_are_forgotten_at_zero():
    router = make_router([record("a", "BOTH"), record("b", "BOTH")], {"a": stats(free=10), "b": stats(free=10)})
    with router.track(choose(router)) as first:
        with router.track(choose(router)) as second:
            assert first.decode.instance_id != second.decode.instance_id   # the busy one is avoided
            assert sum(router.inflight.values()) == 2
    assert router.inflight == {}


def test_in_flight_counts_are_released_when_the_request_fails():
    router = make_router([record("d", "DECODE"), record("p", "PREFILL")])
    with pytest.raises(RuntimeError):
        with router.track(choose(router)):
            assert router.inflight == {"d": 1, "p": 1}
            raise RuntimeError("engine went away")
    assert router.inflight == {}


@pytest.mark.parametrize("policy", ["least_load", "kv_aware", "round_robin"])
def test_suspect_engines_are_routed_around_while_others_can_serve(policy):
    router = make_router([record("sick", "DECODE"), record("well", "DECODE"), record("p", "PREFILL")],
                         {"sick": stats(free=100), "well": stats(running=3, free=1), "p": stats()}, policy,
                         suspect=["sick"])
    assert {choose(router).decode.instance_id for _ in range(4)} == {"well"}
    assert choose(router, exclude=frozenset({"well"})).decode.instance_id == "sick"   # the last resort
    with pytest.raises(ServeError):
        choose(router, exclude=frozenset({"well", "sick"}))
    router.plane.observe("sick:1", stats())   # it answers again
    assert {choose(router).decode.instance_id for _ in range(4)} == ({"sick", "well"} if policy == "round_robin"
                                                                     else {"sick"})


def test_engines_that_join_are_routed_to_and_their_figures_followed():
    router = make_router([record("a", "BOTH")], {"a": stats(running=5)}, "least_load")
    assert choose(router).decode.instance_id == "a"
    router.registry.add(record("b", "BOTH"))
    assert choose(router).decode.instance_id == "b"
    router.plane.observe("b:1", stats(running=9))   # a newer answer replaces the fresh load
    assert choose(router).decode.instance_id == "a"


# ---- kv_aware ----

def test_kv_aware_sends_a_shared_prefix_to_the_prefill_engine_that_holds_it():
    router = make_router([record("d", "DECODE"), record("p1", "PREFILL"), record("p2", "PREFILL"),
                          record("p3", "PREFILL")])
    tokens = prompt(1)
    hold(router, "p2", tokens[:800])              # 50 leading blocks
    hold(router, "p3", tokens[:320] + [1] * 480)  # 20 leading blocks, then others
    route = choose(router, tokens)
    assert route.prefill.instance_id == "p2"
    assert route.prefill_tokens == 1500 - 800     # what p2 will compute, counted as its fresh load
    # a request of the same conversation, with more tokens, goes there too even with p2 a little busier
    router.plane.observe("p2:1", stats(prefill_tokens=400))   # 400 - 800 < 0 - 320 (p3)
    assert choose(router, tokens + prompt(2, 200)).prefill.instance_id == "p2"


def test_kv_aware_leaves_the_holder_when_its_queue_outweighs_the_cached_tokens():
    router = make_router([record("p1", "PREFILL"), record("p2", "PREFILL"), record("d", "DECODE")],
                         {"p1": stats(prefill_tokens=0), "p2": stats(prefill_tokens=5000)})
    tokens = prompt(3)
    hold(router, "p2", tokens)                    # all 93 blocks: 1488 tokens cached
    assert choose(router, tokens).prefill.instance_id == "p1"   # 5000 queued > 1488 saved
    # p1 is now counted as holding the prompt too (it computes it); another prompt held by p2 only:
    other = prompt(5)
    hold(router, "p2", other)
    router.plane.observe("p2:1", stats(prefill_tokens=1000))
    assert choose(router, other).prefill.instance_id == "p2"    # 1000 queued - 1488 < 0


def test_a_routed_prompt_counts_as_held_by_its_engines_before_their_next_stats():
    router = make_router([record("p1", "PREFILL"), record("p2", "PREFILL"), record("d", "DECODE")],
                         {"p1": stats(prefill_tokens=0), "p2": stats(prefill_tokens=0)})
    tokens = prompt(6)
    first = choose(router, tokens)
    with router.track(first):
        pass                                      # done before any Stats answer: no fresh load left
    again = choose(router, tokens)
    assert again.prefill.instance_id == first.prefill.instance_id


def test_kv_aware_spreads_unrelated_load_like_least_load():
    records = [record(f"p{i}", "PREFILL") for i in range(4)] + [record(f"d{i}", "DECODE") for i in range(2)]
    routers = {policy: make_router(records, policy=policy) for policy in ("kv_aware", "least_load")}
    for router in routers.values():
        hold(router, "p0", prompt(99))            # p0 caches a prompt nobody sends
    picks = {}
    for policy, router in routers.items():
        picks[policy], in_flight = [], []
        for n in range(12):
            route = choose(router, prompt(n, 100 + 50 * n))
            in_flight.append(router.track(route))
            in_flight[-1].__enter__()             # sent: fresh load until the next Stats answer
            picks[policy].append((route.decode.instance_id, route.prefill.instance_id))
    assert picks["kv_aware"] == picks["least_load"]
    assert Counter(p for _, p in picks["kv_aware"]).keys() == {"p0", "p1", "p2", "p3"}
    assert Counter(d for d, _ in picks["kv_aware"]) == {"d0": 6, "d1": 6}


def test_kv_aware_ties():
    router = make_router([record("p1", "PREFILL"), record("p2", "PREFILL"), record("d", "DECODE")],
                         {"p1": stats(prefill_tokens=0), "p2": stats(prefill_tokens=160)})
    tokens = prompt(4)
    hold(router, "p2", tokens[:160])              # saves exactly its extra queue: a tie goes to the holder
    assert choose(router, tokens).prefill.instance_id == "p2"
    # equal loads and nothing cached: in turn
    router = make_router([record("p1", "PREFILL"), record("p2", "PREFILL"), record("d", "DECODE")])
    assert [choose(router, prompt(n)).prefill.instance_id for n in range(4)] == ["p1", "p2", "p1", "p2"]


def test_kv_aware_without_hashes_is_least_load():
    router = make_router([record("p1", "PREFILL"), record("p2", "PREFILL"), record("d", "DECODE")],
                         {"p1": stats(prefill_tokens=10), "p2": stats(prefill_tokens=300)})
    hold(router, "p2", prompt(5))
    assert choose(router, prompt_tokens=1500).prefill.instance_id == "p1"   # no tokenizer here: no hashes
    assert choose(router, prompt(5)).prefill.instance_id == "p2"


def test_kv_aware_decode_choice_prefers_the_decode_engine_holding_the_prefix():
    router = make_router([record("d1", "DECODE"), record("d2", "DECODE"), record("p", "PREFILL")],
                         {"d1": stats(running=1), "d2": stats(running=2)})
    tokens = prompt(6)
    hold(router, "d2", tokens)   # 1488 tokens it need not receive, worth more than one request
    route = choose(router, tokens)
    assert route.decode.instance_id == "d2" and route.prefill.instance_id == "p"
    router.plane.observe("d2:1", stats(running=9))
    assert choose(router, tokens).decode.instance_id == "d1"   # 8 requests more outweigh it


def test_kv_aware_skips_an_excluded_holder():
    router = make_router([record("a", "BOTH"), record("b", "BOTH")])
    tokens = prompt(7)
    hold(router, "a", tokens)
    assert choose(router, tokens).decode.instance_id == "a"
    assert choose(router, tokens, exclude=frozenset({"a"})).decode.instance_id == "b"


# ---- fresh load ----

def test_a_long_prompt_does_not_make_short_ones_wait_behind_it():
    router = make_router([record("p1", "PREFILL"), record("p2", "PREFILL"), record("d", "DECODE")],
                         {"p1": stats(), "p2": stats()}, "least_load")
    long = choose(router, prompt_tokens=8000)
    with router.track(long):
        assert fresh(router, long.prefill.address) == (8000, 1)
        shorts = [choose(router, prompt_tokens=100) for _ in range(5)]
        in_flight = [router.track(route) for route in shorts]   # kept: they have not ended
        for t in in_flight:
            t.__enter__()
        assert {r.prefill.instance_id for r in shorts} == {"p2" if long.prefill.instance_id == "p1" else "p1"}
    other = shorts[0].prefill.address
    assert fresh(router, other) == (500, 5)
    # a newer Stats answer counts what it saw; the fresh counts start again from it
    router.plane.observe(long.prefill.address, stats(prefill_tokens=0))
    assert fresh(router, long.prefill.address) == (0, 0)
    assert choose(router, prompt_tokens=100).prefill.address == long.prefill.address


# ---- the KV index ----

@pytest.mark.parametrize("bisect", [0, 4])
def test_kv_index_apply_reset_drop_and_leading_matches(bisect):
    index = KVIndex(bisect=bisect)   # 0: the chain is walked; 4: three holders are bisected
    a = block_hashes(prompt(1), BLOCK)
    index.apply("e1", a[:10])
    index.apply("e2", a[:4] + a[5:9])          # a gap at block 4: only 4 leading blocks count ...
    index.apply("e3", a[:2])
    # ... exactly when the chain is walked; bisection trusts the prefix rule and may credit more
    assert index.match(a) == {"e1": 10, "e2": 4 if not bisect else 9, "e3": 2}
    assert index.match(a[:3]) == {"e1": 3, "e2": 3, "e3": 2}
    assert index.match(block_hashes(prompt(2), BLOCK)) == {}
    index.apply("e1", (), removed=a[3:10])
    assert index.match(a)["e1"] == 3
    index.apply("e2", a[:1], reset=True)        # the whole set: replaces what was known
    assert index.match(a) == {"e1": 3, "e2": 1, "e3": 2} and index.blocks("e2") == 1
    index.drop("e1")
    index.drop("e3")
    index.drop("e2")
    assert index.match(a) == {} and len(index) == 0 and index.engines() == []


def test_the_router_forgets_engines_that_left_the_registry():
    router = make_router([record("a", "BOTH"), record("b", "BOTH")])
    tokens = prompt(9)
    choose(router)                                   # the router has listed the registry
    hold(router, "a", tokens)
    assert choose(router, tokens).decode.instance_id == "a"
    del router.registry.records["a"]
    router.registry.generation += 1
    assert choose(router, tokens).decode.instance_id == "b"
    assert "a:1" not in router.plane.kv_index.match(block_hashes(tokens, BLOCK))


def test_kv_index_walks_a_common_prefix_without_following_its_holders():
    index = KVIndex(common=2)
    system = block_hashes(prompt(1, 64), BLOCK)                  # 4 blocks every engine holds
    chain = block_hashes(prompt(1, 64) + prompt(2, 160), BLOCK)  # the same 4, then 10 of one conversation
    for engine in ("e1", "e2", "e3"):
        index.apply(engine, system)
    index.apply("e2", chain[:9])
    assert index.match(chain) == {"e2": 9}    # credited from block 0; the common part alone tells nothing
    assert index.match(system) == {}


def test_a_route_carries_the_decode_engine_client():
    router = make_router([record("d", "DECODE"), record("p", "PREFILL")])
    route = choose(router)
    assert route.client is router.plane.get("d:1") and route.client.address == route.decode.address


def test_a_decode_engine_prefills_short_or_cached_prompts_itself():
    """max_local_prefill_tokens: a prompt whose uncached part is that short stays on the DECODE
    engine; a longer one goes to the PREFILL engine."""
    from pdserve.cluster.router import prefill_locally
    assert prefill_locally(0, 0) and prefill_locally(64, 64) and not prefill_locally(65, 64)
    assert not prefill_locally(1, -1) and not prefill_locally(0, -1)
    router = make_router([record("d", "DECODE"), record("p", "PREFILL")])
    short = choose(router, prompt_tokens=40, max_local_prefill_tokens=64)
    assert short.prefill is None and short.prefill_tokens == 40
    long = choose(router, prompt_tokens=200, max_local_prefill_tokens=64)
    assert long.prefill is not None and long.prefill.instance_id == "p"
    assert choose(router, prompt_tokens=40).prefill is not None   # not given: always hand off
    # a long prompt the decode engine caches but for its last part is computed there too
    tokens = prompt(9, 200)
    hold(router, "d", tokens)
    cached = choose(router, tokens, max_local_prefill_tokens=64)
    assert cached.prefill is None and cached.prefill_tokens == len(tokens) % BLOCK


def test_a_decode_engine_prefills_itself_when_every_prefill_queue_is_slower():
    """Issue 30: a prompt is handed off unless it would wait in every PREFILL engine's queue
    (queued tokens / measured speed) longer than the DECODE engine takes to compute it after its
    own queue; an unmeasured PREFILL engine is taken to be free."""
    from pdserve.cluster.load import PrefillQueue as Q
    from pdserve.cluster.router import prefill_locally
    idle, busy = Q(0, 1000.0), Q(3000, 1000.0)   # 0 s and 3 s of queue
    assert not prefill_locally(1000, 32, Q(0, 1000.0), [idle])     # the handoff spares the decodes
    assert prefill_locally(1000, 32, Q(0, 500.0), [busy])          # 3 s of wait there > 2 s here
    assert not prefill_locally(1000, 32, Q(1000, 500.0), [busy])   # 3 s > 4 s here: hand off
    assert not prefill_locally(1000, 32, Q(0, 500.0), [busy, idle])   # one engine worth it is enough
    assert prefill_locally(1000, 32, Q(0, 0.0), [busy, busy])      # unmeasured here: as fast as there
    assert not prefill_locally(1000, 32, Q(0, 500.0), [Q(3000, 0.0)])   # unmeasured there: hand off
    assert not prefill_locally(1000, 32, Q(0, 500.0), [])          # no PREFILL engine to compare
    assert not prefill_locally(1000, -1, Q(0, 500.0), [busy])      # -1: always hand off
    # through the router: the prefill engine's answer shows its queue and speed
    router = make_router([record("d", "DECODE"), record("p", "PREFILL")],
                         {"d": stats(prefill_tokens_per_second=500.0),
                          "p": stats(prefill_tokens=3000, prefill_tokens_per_second=1000.0)})
    assert choose(router, prompt_tokens=1000, max_local_prefill_tokens=0).prefill is None
    router.plane.observe("p:1", stats(prefill_tokens=500, prefill_tokens_per_second=1000.0))
    assert choose(router, prompt_tokens=1000, max_local_prefill_tokens=0).prefill.instance_id == "p"

"""Routing policies and the router's choices, over records made in memory (no processes, no etcd)."""
from collections import Counter
from types import SimpleNamespace

import pytest

from pdserve.cluster.router import LeastLoadPolicy, RoundRobinPolicy, Router
from pdserve.common.errors import Cause, ServeError
from pdserve.common.records import READY, EngineRecord


def record(instance_id: str, role: str, model: str = "m", state: str = READY) -> EngineRecord:
    return EngineRecord(instance_id=instance_id, model=model, version="1", role=role, device="cpu", node="n",
                        address=f"{instance_id}:1", state=state)


class View:
    """What the router reads of a RegistryView: its records."""

    def __init__(self, records):
        self.records = {r.instance_id: r for r in records}

    def engines(self, model, version=None, roles=("BOTH", "DECODE", "PREFILL"), states=(READY,)):
        return [r for r in self.records.values() if r.model == model and (version is None or r.version == version)
                and r.role in roles and r.state in states]


class Clients:
    """What the router reads of EngineClients: each engine's last stats."""

    def __init__(self, stats: dict):
        self.stats = stats

    def peek(self, address):
        stats = self.stats.get(address.split(":")[0])
        return SimpleNamespace(last_stats=stats, suspect=address.startswith("sick")) if stats else None


def stats(waiting=0, awaiting=0, free=100, prefill_tokens=0):
    return SimpleNamespace(num_waiting=waiting, num_awaiting_kv=awaiting, num_free_blocks=free,
                           waiting_prefill_tokens=prefill_tokens)


def test_round_robin_takes_turns_per_model_and_role():
    policy = RoundRobinPolicy()
    engines = [record("b", "BOTH"), record("a", "BOTH"), record("c", "BOTH")]
    picks = [policy.choose(engines, load=None).instance_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    other = [record("x", "BOTH", model="other"), record("y", "BOTH", model="other")]
    assert policy.choose(other, load=None).instance_id == "x"   # its own turn counter


def test_least_load_picks_the_lowest_and_spreads_ties():
    policy = LeastLoadPolicy()
    engines = [record("a", "BOTH"), record("b", "BOTH"), record("c", "BOTH")]
    load = {"a": (2,), "b": (1,), "c": (1,)}
    picks = Counter(policy.choose(engines, lambda e: load[e.instance_id]).instance_id for _ in range(10))
    assert set(picks) == {"b", "c"} and picks["b"] == picks["c"] == 5


def test_router_pairs_a_decode_engine_with_the_least_loaded_prefill_engine():
    view = View([record("d", "DECODE"), record("p1", "PREFILL"), record("p2", "PREFILL")])
    router = Router(view, Clients({"p1": stats(prefill_tokens=900), "p2": stats(prefill_tokens=100)}))
    route = router.choose("m", "1")
    assert route.decode.instance_id == "d" and route.prefill.instance_id == "p2"


def test_router_falls_back_to_local_prefill_and_never_pairs_both_engines():
    router = Router(View([record("d", "DECODE")]), Clients({}))
    assert router.choose("m", "1").prefill is None
    router = Router(View([record("b", "BOTH"), record("p", "PREFILL")]), Clients({}))
    route = router.choose("m", "1")
    assert route.decode.instance_id == "b" and route.prefill is None


def test_no_engine_is_a_typed_error_at_once():
    router = Router(View([record("p", "PREFILL"), record("d", "DECODE", state="draining")]), Clients({}))
    with pytest.raises(ServeError) as info:
        router.choose("m", "1")
    assert info.value.cause == Cause.NO_ENGINE and "no live engine" in info.value.message


def test_in_flight_counts_steer_and_are_forgotten_at_zero():
    view = View([record("a", "BOTH"), record("b", "BOTH")])
    router = Router(view, Clients({"a": stats(free=10), "b": stats(free=10)}))
    with router.track(router.choose("m", "1")) as first:
        with router.track(router.choose("m", "1")) as second:
            assert first.decode.instance_id != second.decode.instance_id   # the busy one is avoided
            assert sum(router.inflight.values()) == 2
    assert router.inflight == {}


def test_in_flight_counts_are_released_when_the_request_fails():
    router = Router(View([record("d", "DECODE"), record("p", "PREFILL")]), Clients({}))
    with pytest.raises(RuntimeError):
        with router.track(router.choose("m", "1")):
            assert router.inflight == {"d": 1, "p": 1}
            raise RuntimeError("engine went away")
    assert router.inflight == {}


def test_suspect_engines_are_routed_around_while_others_can_serve():
    view = View([record("sick", "DECODE"), record("well", "DECODE"), record("p", "PREFILL")])
    router = Router(view, Clients({"sick": stats(free=1000), "well": stats(free=1), "p": stats()}))
    assert {router.choose("m", "1").decode.instance_id for _ in range(4)} == {"well"}
    assert router.choose("m", "1", exclude=frozenset({"well"})).decode.instance_id == "sick"   # the last resort
    with pytest.raises(ServeError):
        router.choose("m", "1", exclude=frozenset({"well", "sick"}))

"""A model version's lifecycle, the engine watchdog and the worker's spec and ready line: pure
logic, no processes."""
import pytest

from pdserve.common.etcd import EtcdSecurity
from pdserve.engine.config import EngineConfig
from pdserve.engine.spec import WorkerSpec, read_answer
from pdserve.repository.engine_process import Watchdog, stall_reason
from pdserve.repository.lifecycle import (TRANSITIONS, DrainVerdict, Event, Lifecycle, VersionState,
                                          next_state)

S = VersionState


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def test_a_version_loads_serves_drains_and_unloads_with_a_reason_each_step():
    clock = Clock()
    life = Lifecycle(clock)
    assert life.state is S.LOADING and not life.serving
    clock.now = 103.0
    up = life.up()
    assert (up.source, up.target, up.at) == (S.LOADING, S.READY, 103.0) and life.serving and life.since == 103.0
    drain = life.drain(30.0, "reloaded")
    assert (drain.target, drain.reason) == (S.DRAINING, "reloaded") and not life.serving
    stop = life.stop("drained")
    assert stop.target is S.UNLOADED and life.reason == "drained"
    assert [t.target for t in life.history] == [S.READY, S.DRAINING, S.UNLOADED]


def test_a_failed_start_is_terminal_and_a_second_stop_changes_nothing():
    life = Lifecycle(Clock())
    assert life.start_failed("instance m_0 on cpu exited with code 3").target is S.FAILED
    assert life.stop() is None and life.state is S.FAILED and "exited with code 3" in life.reason
    assert life.up() is None and life.drain(1.0) is None
    unloaded = Lifecycle(Clock())
    unloaded.up()
    unloaded.stop()
    assert unloaded.stop() is None and unloaded.state is S.UNLOADED


def test_only_the_drawn_transitions_exist():
    assert next_state(S.LOADING, Event.DRAIN) is None        # a version that never served is stopped, not drained
    assert next_state(S.LOADING, Event.STOP) is S.UNLOADED   # a load given up
    assert next_state(S.DRAINING, Event.UP) is None
    assert all(next_state(S.UNLOADED, e) is None and next_state(S.FAILED, e) is None for e in Event)
    assert {target for target in TRANSITIONS.values()} == {S.READY, S.DRAINING, S.UNLOADED, S.FAILED}


def test_a_drain_ends_when_idle_or_at_its_deadline():
    clock = Clock()
    life = Lifecycle(clock)
    life.up()
    life.drain(10.0)
    assert life.drain_verdict(idle=False) is DrainVerdict.WAIT
    assert life.drain_verdict(idle=True) is DrainVerdict.DRAINED
    clock.now += 10.0
    assert life.drain_verdict(idle=False) is DrainVerdict.TIMED_OUT
    life.stop()   # stopped meanwhile (the server closes): nothing left to wait for
    assert life.drain_verdict(idle=False) is DrainVerdict.DRAINED


def test_stall_reasons():
    # no answer yet: judged from when the engine became ready
    assert stall_reason(now=130.0, ready_at=100.0, stats_at=0.0, seconds_since_progress=None, limit_s=20) == \
        "no Stats answer for 30 s"
    assert stall_reason(now=130.0, ready_at=100.0, stats_at=125.0, seconds_since_progress=3.0, limit_s=20) == ""
    assert stall_reason(now=130.0, ready_at=100.0, stats_at=129.0, seconds_since_progress=25.0, limit_s=20) == \
        "no progress for 25 s with requests queued"


def test_the_watchdog_waits_for_fresh_answers_after_the_front_end_stood_still():
    clock = Clock()
    dog = Watchdog(clock, tick_s=0.25, late_s=2.0, refresh_s=5.0)
    clock.now += 0.3
    assert dog.tick() == 0.0 and dog.judging()
    clock.now += 10.25           # SIGSTOP of the front end for 10 s
    assert dog.tick() == pytest.approx(10.0) and not dog.judging()
    clock.now += 4.9
    assert dog.tick() > 0 and not dog.judging()   # one late tick again restarts the wait
    for _ in range(19):          # the Stats polls catch up on time
        clock.now += 0.25
        assert dog.tick() == 0.0 and not dog.judging()
    clock.now += 0.25
    assert dog.tick() == 0.0 and dog.judging()


def test_the_worker_spec_round_trips_through_json():
    spec = WorkerSpec("m-v1-g_0-abcd", "m", "1", "DECODE", "127.0.0.1", EngineConfig("/models/m/1", max_num_seqs=8),
                      kv_transport="mooncake", etcd_endpoints=("127.0.0.1:2379",), cluster="blue", node="n1",
                      lease_ttl=5, cluster_token_file="/run/token", etcd_security=EtcdSecurity(cacert="/ca.pem"))
    back = WorkerSpec.from_json(spec.to_json())
    assert back == spec and isinstance(back.engine, EngineConfig) and back.etcd_security.use_tls
    plain = WorkerSpec("i", "m", "1", "BOTH", "h", EngineConfig("/p"))
    assert WorkerSpec.from_json(plain.to_json()).kv_transport == "none"
    with pytest.raises(ValueError):
        WorkerSpec.from_json('{"instance_id": "i"}')


def test_the_ready_line():
    assert read_answer(b'{"address": "127.0.0.1:4000"}\n') == ("127.0.0.1:4000", "")
    assert read_answer(b'{"error": "OSError: no such model"}\n') == ("", "OSError: no such model")
    assert read_answer(b"garbage")[1].startswith("an unreadable ready line")

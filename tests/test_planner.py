"""Elastic roles (AUTO): the planner's decision as a pure function, its switch with fake engines,
and the config and supervisor pieces around it. No processes."""
import asyncio
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from pdserve_testing.harness import config_text, write_config

from pdserve.repository.config import load_model_spec
from pdserve.repository.planner import (BOTH, DECODE, PREFILL, EngineLoad, History, Planner, PlannerSettings, Switch,
                                        decide, initial_roles)

S = PlannerSettings(prefill_queue_high=1000, prefill_queue_low=250, decode_seqs_high=8, flip_decode_seqs=2,
                    window_polls=3, hold_polls=3, cooldown_s=10.0)


def load(name, role, queue=0, running=0, **kw):
    return EngineLoad(name, role, queued_prompt_tokens=queue, running=running, switchable=kw.pop("switchable", True),
                      **kw)


def run(polls, settings=S, history=None, start=100.0, step=1.0):
    """Feeds the polls (each a list of EngineLoad) to decide, one second apart; returns
    [(poll index, Switch)] and the last history."""
    history = history or History()
    switches = []
    for i, loads in enumerate(polls):
        switch, history = decide(loads, settings, history, start + i * step)
        if switch is not None:
            switches.append((i, switch))
    return switches, history


def prefill_heavy():
    return [load("p0", PREFILL, queue=3000), load("d0", DECODE, running=1), load("d1", DECODE, running=0)]


def decode_heavy():
    return [load("p0", PREFILL), load("p1", PREFILL, queue=10), load("d0", DECODE, running=20)]


def test_initial_split():
    assert initial_roles(0) == []
    assert initial_roles(1) == [BOTH]
    assert initial_roles(2) == [PREFILL, DECODE]
    assert initial_roles(3) == [PREFILL, DECODE, DECODE]
    assert initial_roles(4) == [PREFILL, PREFILL, DECODE, DECODE]
    for n in range(2, 9):
        roles = initial_roles(n)
        assert roles.count(PREFILL) >= 1 and roles.count(DECODE) >= 1 and len(roles) == n


def test_prefill_pressure_turns_the_idlest_decode_engine_into_prefill():
    switches, _ = run([prefill_heavy()] * 5)
    assert [(i, s.instance_id, s.from_role, s.to_role) for i, s in switches] == [(4, "d1", DECODE, PREFILL)]
    reason = switches[0][1].reason
    assert "prefill pressure" in reason and "3000 queued prompt tokens" in reason, reason


def test_decode_pressure_turns_a_prefill_engine_into_decode():
    switches, _ = run([decode_heavy()] * 5)
    assert [(i, s.instance_id, s.from_role, s.to_role) for i, s in switches] == [(4, "p0", PREFILL, DECODE)]
    assert "decode pressure" in switches[0][1].reason and "20.0 running sequences" in switches[0][1].reason


def test_an_idle_prefill_engine_takes_decodes_as_both():
    # xLLM's P->D flip: prompts rarely queue while the decoder runs streams -> the PREFILL engine
    # becomes BOTH (it also computes its own prompts), below the decode-pressure mark
    idle = [load("p0", PREFILL, queue=100), load("d0", DECODE, running=3)]
    switches, _ = run([idle] * 5)
    assert [(i, s.instance_id, s.from_role, s.to_role) for i, s in switches] == [(4, "p0", PREFILL, BOTH)]
    assert "idle prefill" in switches[0][1].reason and "3.0 sequences" in switches[0][1].reason
    assert not switches[0][1].drains, "it keeps serving what it holds: nothing to drain"
    # not while the decoders idle, nor while prompts queue, nor with the flip off
    assert run([[load("p0", PREFILL), load("d0", DECODE, running=1)]] * 10)[0] == []   # < flip_decode_seqs
    assert run([[load("p0", PREFILL, queue=600), load("d0", DECODE, running=3)]] * 10)[0] == []
    assert run([idle] * 10, settings=PlannerSettings(**{**S.__dict__, "flip_decode_seqs": 0}))[0] == []
    # decoders at their limit: the stronger rule makes it a DECODE engine instead
    assert [s.to_role for _, s in run([decode_heavy()] * 5)[0]] == [DECODE]


def test_both_engines_are_decoders_and_prefill_pressure_takes_one_back():
    # after the flip: no PREFILL engine, and a light load leaves the split alone
    flipped = [load("b0", BOTH, running=2), load("d0", DECODE, running=2)]
    assert run([flipped] * 20)[0] == []
    # prompts pile up on both while decoding is light: one becomes PREFILL again (after a drain)
    heavy = [load("b0", BOTH, queue=3000, running=1), load("d0", DECODE, queue=3000, running=2)]
    switches, _ = run([heavy] * 5)
    assert [(s.instance_id, s.from_role, s.to_role, s.drains) for _, s in switches] == [("b0", BOTH, PREFILL, True)]
    # never the last engine that generates
    assert run([[load("b0", BOTH, queue=9000)]] * 10)[0] == []


def test_slow_decode_steps_are_decode_pressure_when_a_tpot_limit_is_set():
    slow = [load("p0", PREFILL), load("p1", PREFILL), load("d0", DECODE, running=3, step_seconds=0.2)]
    assert run([slow] * 5, settings=PlannerSettings(**{**S.__dict__, "flip_decode_seqs": 0}))[0] == []
    switches, _ = run([slow] * 5, settings=PlannerSettings(**{**S.__dict__, "tpot_high_s": 0.1}))
    assert [s.to_role for _, s in switches] == [DECODE] and "decode steps of 200.0 ms" in switches[0][1].reason
    # slow decoding also vetoes prefill pressure: taking a decoder would make it slower
    busy = [load("p0", PREFILL, queue=5000), load("d0", DECODE, running=1, step_seconds=0.2),
            load("d1", DECODE, running=1, step_seconds=0.2)]
    assert run([busy] * 6, settings=PlannerSettings(**{**S.__dict__, "tpot_high_s": 0.1}))[0] == []


def test_the_last_decoder_is_never_taken():
    lonely = [load("p0", PREFILL, queue=50_000), load("d0", DECODE)]
    assert run([lonely] * 30)[0] == []
    # a fixed BOTH engine (not switchable) generates too: the AUTO decoder may then go
    with_both = lonely + [load("b0", BOTH, switchable=False)]
    switches, _ = run([with_both] * 5)
    assert [(s.instance_id, s.to_role) for _, s in switches] == [("d0", PREFILL)]


def test_without_prefill_engines_the_decoders_queue_counts():
    # after every PREFILL engine became DECODE, prompts queue on the decoders themselves
    loads = [load("d0", DECODE, queue=2500), load("d1", DECODE, queue=2500), load("d2", DECODE)]
    switches, _ = run([loads] * 5)
    assert [s.to_role for _, s in switches] == [PREFILL]


def test_only_switchable_engines_are_chosen_and_nothing_happens_while_one_drains():
    fixed = [load("p0", PREFILL, queue=3000), load("d0", DECODE, switchable=False),
             load("d1", DECODE, switchable=False)]
    assert run([fixed] * 10)[0] == []
    draining = prefill_heavy() + [load("x", DECODE, draining=True, switchable=False)]
    assert run([draining] * 10)[0] == []


def test_a_spike_does_not_switch_and_pressure_must_last():
    quiet = [load("p0", PREFILL, queue=100), load("d0", DECODE, running=1), load("d1", DECODE)]
    spike = [load("p0", PREFILL, queue=20_000), load("d0", DECODE, running=1), load("d1", DECODE)]
    assert run([quiet, spike, quiet, quiet, quiet, spike, quiet, quiet, quiet] * 3)[0] == []
    # the streak restarts when the condition breaks: a median over 3 polls needs 2 of them high
    assert run([prefill_heavy(), prefill_heavy(), quiet, quiet, quiet, prefill_heavy(), prefill_heavy()])[0] == []
    assert [i for i, _ in run([quiet, quiet] + [prefill_heavy()] * 5)[0]] == [5]


def test_no_flapping_on_a_signal_that_swings_between_both_pressures():
    # the same engines, the load swinging every poll between prefill-heavy and decode-heavy
    both = [[load("p0", PREFILL, queue=4000), load("d0", DECODE), load("d1", DECODE)],
            [load("p0", PREFILL), load("d0", DECODE, running=20), load("d1", DECODE, running=20)]]
    assert run([both[i % 2] for i in range(60)])[0] == []
    # and with a seeded random signal around the thresholds, applying each switch to the roles:
    # switches are a cooldown apart and a switch is never undone within the cooldown after it
    rng = random.Random(11)
    roles = {"e0": PREFILL, "e1": DECODE, "e2": DECODE}
    history, done = History(), []
    for i in range(600):
        loads = [load(name, role, queue=rng.randint(0, 2400) if role == PREFILL else rng.randint(0, 50),
                      running=rng.randint(0, 18) if role == DECODE else 0) for name, role in roles.items()]
        switch, history = decide(loads, S, history, float(i))
        if switch:
            roles[switch.instance_id] = switch.to_role
            done.append((i, switch))
            assert sum(r in (DECODE, BOTH) for r in roles.values()) >= 1
    times = [i for i, _ in done]
    assert all(b - a >= S.cooldown_s for a, b in zip(times, times[1:])), times
    assert len(done) <= 600 / S.cooldown_s
    for (i, a), (j, b) in zip(done, done[1:]):
        if b.instance_id == a.instance_id:
            assert j - i >= S.cooldown_s


def test_cooldown_spaces_switches_and_the_window_restarts():
    prefill_engines = ["p0"]
    history, switches = History(), []
    decoders = ["d0", "d1", "d2", "d3"]
    for t in range(40):
        loads = ([load(p, PREFILL, queue=5000) for p in prefill_engines] + [load(d, DECODE) for d in decoders])
        switch, history = decide(loads, S, history, 100.0 + t)
        if switch:
            switches.append(t)
            decoders.remove(switch.instance_id)
            prefill_engines.append(switch.instance_id)
    # the first once the window is full and the pressure held hold_polls; then one per cooldown (the
    # window restarts after each); one decoder stays
    assert switches == [4, 14, 24] and decoders == ["d3"], (switches, decoders)


def test_settings_from_config_parameters():
    s = PlannerSettings.from_parameters({"max_num_seqs": 16, "planner_prefill_queue_high": 800,
                                         "planner_cooldown_s": 2.5, "planner_hold_polls": 0})
    assert (s.prefill_queue_high, s.prefill_queue_low, s.decode_seqs_high, s.flip_decode_seqs, s.cooldown_s,
            s.hold_polls) == (800, 200, 8, 1, 2.5, 1)
    d = PlannerSettings.from_parameters({})
    assert (d.prefill_queue_high, d.prefill_queue_low, d.decode_seqs_high, d.flip_decode_seqs, d.interval_s) == \
        (2048, 512, 32, 1, 1.0)


def test_auto_in_config_pbtxt(tmp_path):
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    write_config(str(folder), config_text(role_groups=(("AUTO", "cpu"), ("AUTO", "cpu"), ("AUTO", "cpu")),
                                          kv_transport="mooncake", planner_interval_s=0.5,
                                          planner_decode_seqs_high=4))
    spec = load_model_spec(str(folder))
    assert [i.role for i in spec.instances] == ["AUTO"] * 3
    assert spec.engine_parameters["planner_interval_s"] == 0.5
    assert "planner_interval_s" not in spec.engine_config(1, "cpu").to_dict()


@pytest.mark.parametrize("params,words", [
    ({"kv_transport": "none"}, ["AUTO needs a KV transport", "mooncake"]),
    ({"planner_prefill_queue_low": 4000}, ["planner_prefill_queue_low", "below", "flap"]),
])
def test_auto_config_errors(tmp_path, params, words):
    from pdserve.repository.config import ConfigError
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    write_config(str(folder), config_text(role_groups=(("AUTO", "cpu"), ("AUTO", "cpu")), **params))
    with pytest.raises(ConfigError) as info:
        load_model_spec(str(folder))
    assert all(w in str(info.value) for w in words), str(info.value)


def test_the_supervisor_gives_auto_instances_a_split_and_a_transport(tmp_path):
    from pdserve.repository.supervisor import ClusterSettings, Supervisor
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    write_config(str(folder), config_text(role_groups=(("AUTO", "cpu"), ("DECODE", "cpu"), ("AUTO", "cpu"),
                                                       ("AUTO", "cpu"))))
    spec = load_model_spec(str(folder))
    sup = Supervisor("127.0.0.1", str(tmp_path / "run"), ClusterSettings([]), clients=None, registry=None)
    engines = sup.deployment(spec, 1).engines
    assert [(e.instance.role, e.role) for e in engines] == [("AUTO", PREFILL), ("DECODE", DECODE),
                                                           ("AUTO", DECODE), ("AUTO", DECODE)]
    assert [e.spec.kv_transport for e in engines] == ["mooncake"] * 4
    assert engines[0].replacement().role == PREFILL
    engines[0].role = DECODE   # a switched engine restarts in its current role
    assert engines[0].replacement().spec.role == DECODE


def test_the_kv_transport_default_is_decided_by_the_config(tmp_path):
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    write_config(str(folder), config_text(role_groups=(("BOTH", "cpu"),)))
    spec = load_model_spec(str(folder))
    assert [spec.kv_transport(role) for role in ("BOTH", "PREFILL", "DECODE", "AUTO")] == \
        ["none", "mooncake", "mooncake", "mooncake"]
    spec.engine_parameters["kv_transport"] = "mooncake:rdma"
    assert {spec.kv_transport(role) for role in ("BOTH", "PREFILL", "AUTO")} == {"mooncake:rdma"}


def test_planner_parameters_are_the_settings_fields():
    from pdserve.repository.config import PLANNER_PARAMETERS
    assert PLANNER_PARAMETERS["planner_interval_s"] == "float" and PLANNER_PARAMETERS["planner_hold_polls"] == "int"
    assert set(PLANNER_PARAMETERS) == {f"planner_{name}" for name in PlannerSettings.__dataclass_fields__}


# ---- the switch, with fake engines ----------------------------------------------------------
class FakeEngines:
    """planner.Engines over one fake engine that holds a request for `busy_polls` polls."""

    def __init__(self, instance_id, role, busy_polls):
        self.what = "m v1"
        self.instance_id, self.role, self.busy_polls = instance_id, role, busy_polls
        self.states: list[tuple[str, str]] = []
        self.counts: Counter = Counter()

    async def loads(self):
        return []

    def owns(self, instance_id):
        return instance_id == self.instance_id

    async def drain(self, instance_id):
        self.states.append(("draining", ""))

    async def held(self, instance_id):
        self.busy_polls -= 1
        return int(self.busy_polls > 0)

    async def publish(self, instance_id, role):
        self.states.append(("ready", role))
        self.role = role

    def count(self, switch, switched):
        self.counts[(switch.instance_id, switch.from_role, switch.to_role, switched)] += 1


def test_a_switch_drains_waits_for_idle_then_publishes_the_new_role():
    engines = FakeEngines("d0", DECODE, busy_polls=3)
    planner = Planner(engines, PlannerSettings(drain_timeout_s=5))
    assert asyncio.run(planner.switch(Switch("d0", DECODE, PREFILL, "test")))
    assert engines.states == [("draining", ""), ("ready", PREFILL)] and engines.role == PREFILL
    assert engines.counts == {("d0", DECODE, PREFILL, True): 1}


def test_a_switch_that_does_not_drain_in_time_is_abandoned_in_the_old_role():
    engines = FakeEngines("p0", PREFILL, busy_polls=10**6)
    planner = Planner(engines, PlannerSettings(drain_timeout_s=0.3))
    assert not asyncio.run(planner.switch(Switch("p0", PREFILL, DECODE, "test")))
    assert engines.states == [("draining", ""), ("ready", PREFILL)] and engines.role == PREFILL
    assert engines.counts == {("p0", PREFILL, DECODE, False): 1}


def test_a_flip_to_both_publishes_without_a_drain():
    # the engine holds prefill calls the whole time: as BOTH it finishes them, so nothing waits
    engines = FakeEngines("p0", PREFILL, busy_polls=10**6)
    planner = Planner(engines, PlannerSettings(drain_timeout_s=0.3))
    assert asyncio.run(planner.switch(Switch("p0", PREFILL, BOTH, "test")))
    assert engines.states == [("ready", BOTH)] and engines.role == BOTH
    assert engines.counts == {("p0", PREFILL, BOTH, True): 1}


def test_a_switch_of_an_engine_not_owned_does_nothing():
    engines = FakeEngines("d0", DECODE, busy_polls=0)
    assert not asyncio.run(Planner(engines, PlannerSettings()).switch(Switch("x9", DECODE, PREFILL, "test")))
    assert engines.states == [] and not engines.counts


def test_the_deployment_counts_switches_for_the_metrics(tmp_path):
    from pdserve.repository.supervisor import ClusterSettings, Deployment, DeploymentEngines, Supervisor
    sup = Supervisor("127.0.0.1", str(tmp_path / "run"), ClusterSettings([]), clients=None, registry=None)
    dep = Deployment(SimpleNamespace(name="m"), 1, [], sup)
    engines = DeploymentEngines(dep)
    engines.count(Switch("d0", DECODE, PREFILL, "test"), switched=True)
    engines.count(Switch("p0", PREFILL, DECODE, "test"), switched=False)
    assert sup.role_switches == {("m", "1", "d0", DECODE, PREFILL): 1}
    assert sup.role_switches_abandoned == {("m", "1", "p0", PREFILL, DECODE): 1}
    assert engines.what == "m v1" and not engines.owns("d0")

"""Starts, watches, restarts and stops the engines of each model version this node serves.

A Deployment is the set of engines serving one version of one model under one config; where it
stands is its Lifecycle (repository/lifecycle.py), each engine an EngineProcess
(repository/engine_process.py). Its engines register in etcd as `standby`; the manager
activates them (`ready`, routable) when the whole deployment is up, and sets them `draining`
before stopping them, so routers on every node stop sending new requests while the ones in
flight finish. An engine that dies while its deployment serves is taken out of the registry at
once and restarted.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from pdserve.cluster.load import LoadPlane
from pdserve.cluster.registry import RegistryView
from pdserve.common.errors import Cause, ServeError
from pdserve.common.etcd import EtcdUnavailable
from pdserve.common.records import DRAINING, READY
from pdserve.repository.config import DEFAULT_MAX_INFLIGHT_REQUESTS, ModelSpec
from pdserve.repository.engine_process import (ENGINE_STALL_S, MONITOR_TICK_S, ClusterSettings, EngineProcess,
                                               EngineStartError, Watchdog)
from pdserve.repository.lifecycle import DrainVerdict, Lifecycle, Transition
from pdserve.repository.planner import AUTO, EngineLoad, Planner, PlannerSettings, Switch, engine_load, initial_roles

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 2.0
RECORD_DELETE_ATTEMPTS = 40   # about 6 minutes of retries
DRAIN_POLL_S = 0.1


@dataclass
class Deployment:
    """The engines of one model version under one config generation."""
    spec: ModelSpec
    version: int
    engines: list[EngineProcess]
    supervisor: "Supervisor"
    inflight: int = 0
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    _monitor: asyncio.Task | None = field(default=None, repr=False)
    planner: Planner | None = field(default=None, repr=False)   # AUTO instances' roles (two or more)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def active(self) -> bool:
        """Routable, with its engines restarted when they die (READY)."""
        return self.lifecycle.serving

    @property
    def instance_ids(self) -> set[str]:
        return {e.instance_id for e in self.engines}

    @contextlib.contextmanager
    def serving_request(self):
        """Counts a request routed here until it ends, so a drain waits for it; past the
        version's max_inflight_requests, refuses it (RESOURCE_EXHAUSTED)."""
        limit = self.spec.engine_parameters.get("max_inflight_requests", DEFAULT_MAX_INFLIGHT_REQUESTS)
        if self.inflight >= limit:
            raise ServeError(Cause.OVERLOADED, f"model '{self.name}' version {self.version} has {self.inflight} "
                                               f"requests in flight on this node, its limit (max_inflight_requests "
                                               f"{limit}); retry later")
        self.inflight += 1
        try:
            yield self
        finally:
            self.inflight -= 1

    def live_engines(self) -> list[EngineProcess]:
        return [e for e in self.engines if e.client is not None and e.alive]

    def _log(self, transition: Transition | None) -> None:
        if transition is not None:
            log.info("%s version %d: %s -> %s (%s)", self.name, self.version, transition.source.value,
                     transition.target.value, transition.reason)

    async def start(self) -> None:
        results = await asyncio.gather(*(e.start() for e in self.engines), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            reason = "; ".join(str(e) for e in errors)
            self._log(self.lifecycle.start_failed(reason))
            await self.stop()
            raise EngineStartError(reason)

    async def activate(self) -> None:
        """Makes the engines routable cluster-wide and starts restarting any that die."""
        await asyncio.gather(*(e.set_state(READY) for e in self.engines))
        await self.supervisor.wait_in_view(self.instance_ids, READY)
        self._log(self.lifecycle.up())
        self._monitor = asyncio.ensure_future(self.supervisor.monitor(self))
        if sum(e.instance.role == AUTO for e in self.engines) >= 2:
            settings = PlannerSettings.from_parameters(self.spec.engine_parameters)
            self.planner = Planner(DeploymentEngines(self), settings)
            self.planner.start()

    async def _stop_planner(self) -> None:
        if self.planner is not None:
            await self.planner.stop()

    async def drain(self, timeout: float, reason: str = "retired (a reload or an unload)") -> None:
        """Stops new routing here, then waits for the requests already routed to finish."""
        self._log(self.lifecycle.drain(timeout, reason))
        await self._stop_planner()
        await asyncio.gather(*(e.set_state(DRAINING) for e in self.engines if e.alive), return_exceptions=True)
        while True:
            idle = self.inflight == 0 and all(await asyncio.gather(*(e.idle() for e in self.engines)))
            verdict = self.lifecycle.drain_verdict(idle)
            if verdict is DrainVerdict.TIMED_OUT:
                log.warning("%s version %d: requests still held after the drain timeout (%.0f s); stopping anyway",
                            self.name, self.version, timeout)
            if verdict is not DrainVerdict.WAIT:
                return
            await asyncio.sleep(DRAIN_POLL_S)

    async def stop(self, reason: str = "stopped") -> None:
        self._log(self.lifecycle.stop(reason))
        if self._monitor is not None:
            self._monitor.cancel()
        await self._stop_planner()
        await asyncio.gather(*(e.stop() for e in self.engines), return_exceptions=True)


class DeploymentEngines:
    """The planner's reach into one deployment (planner.Engines): the version's engines on every
    node, and this node's AUTO engines to switch."""

    def __init__(self, dep: Deployment):
        self.dep = dep
        self.supervisor = dep.supervisor
        self.what = f"{dep.name} v{dep.version}"

    def _own(self) -> dict[str, EngineProcess]:
        return {e.instance_id: e for e in self.dep.live_engines() if e.instance.role == AUTO and not e.stopping}

    def owns(self, instance_id: str) -> bool:
        return instance_id in self._own()

    def _engine(self, instance_id: str) -> EngineProcess:
        engine = self._own().get(instance_id)
        if engine is None:
            raise LookupError(f"engine {instance_id} is gone")
        return engine

    async def loads(self) -> list[EngineLoad]:
        registry, clients = self.supervisor.registry, self.supervisor.clients
        records = registry.engines(self.dep.name, str(self.dep.version), states=(READY, DRAINING))
        answers = await asyncio.gather(*(clients.get(r.address).stats() for r in records), return_exceptions=True)
        own = self._own()
        # an engine that does not answer is left out: the router avoids it, its supervisor restarts it
        return [engine_load(record, stats, record.instance_id in own)
                for record, stats in zip(records, answers) if not isinstance(stats, BaseException)]

    async def drain(self, instance_id: str) -> None:
        await self._engine(instance_id).set_state(DRAINING)
        await self.supervisor.wait_in_view({instance_id}, DRAINING)

    async def held(self, instance_id: str) -> int:
        return await self._engine(instance_id).held()

    async def publish(self, instance_id: str, role: str) -> None:
        await self._engine(instance_id).set_state(READY, role=role)
        await self.supervisor.wait_in_view({instance_id}, READY)

    def count(self, switch: Switch, switched: bool) -> None:
        key = (self.dep.name, str(self.dep.version), switch.instance_id, switch.from_role, switch.to_role)
        (self.supervisor.role_switches if switched else self.supervisor.role_switches_abandoned)[key] += 1


class Supervisor:
    def __init__(self, host: str, run_dir: str, cluster: ClusterSettings, clients: LoadPlane,
                 registry: RegistryView):
        self.host = host
        self.run_dir = run_dir
        self.cluster = cluster
        self.clients = clients
        self.registry = registry
        # AUTO role switches of this node's planners, by (model, version, instance, from_role, to_role).
        self.role_switches: Counter[tuple[str, str, str, str, str]] = Counter()
        self.role_switches_abandoned: Counter[tuple[str, str, str, str, str]] = Counter()
        os.makedirs(run_dir, exist_ok=True)

    def deployment(self, spec: ModelSpec, version: int) -> Deployment:
        auto_roles = iter(initial_roles(sum(inst.role == AUTO for inst in spec.instances)))
        engines = [EngineProcess(spec, version, inst, self.host, self.run_dir, self.cluster, self.clients,
                                 role=next(auto_roles) if inst.role == AUTO else "")
                   for inst in spec.instances]
        return Deployment(spec, version, engines, self)

    async def wait_in_view(self, instance_ids: set[str], state: str, timeout: float = 5.0) -> None:
        """Waits until this node's registry view shows the engines in the state (etcd round trip)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            seen = {r.instance_id for r in self.registry.records.values() if r.state == state}
            if instance_ids <= seen:
                return
            await asyncio.sleep(0.02)
        log.warning("engines %s not seen %s in etcd within %.0f s; going on", sorted(instance_ids), state, timeout)

    async def monitor(self, dep: Deployment) -> None:
        """Restarts the engines of a serving deployment that die (crash, kill -9, OOM) or look frozen."""
        watchdog = Watchdog()
        while dep.active:
            await asyncio.sleep(MONITOR_TICK_S)
            stood = watchdog.tick()
            if stood:
                log.warning("the front end itself stood still for %.1f s; engine stalls are judged again once "
                            "their Stats answers are fresh", stood)
            for i, engine in enumerate(list(dep.engines)):
                if engine.stopping or not dep.active:
                    continue
                if engine.alive:
                    why = engine.stalled(ENGINE_STALL_S) if watchdog.judging() else ""
                    if not why:
                        continue
                    log.error("engine %s (%s %s) looks frozen (%s): killing it", engine.instance_id, dep.name,
                              engine.role, why)
                    engine.kill()
                log.error("engine %s (%s %s) exited with code %s: restarting it", engine.instance_id, dep.name,
                          engine.role, engine.proc.returncode if engine.proc else "?")
                await self._forget(engine)
                replacement = engine.replacement()
                dep.engines[i] = replacement
                try:
                    await replacement.start()
                    await replacement.set_state(READY)
                    log.info("engine %s restarted as %s", engine.instance_id, replacement.instance_id)
                except Exception as exc:
                    log.error("restart of %s failed: %s; retrying", engine.instance_id, exc)
                    dep.engines[i] = engine  # try again from the dead one on the next round
                    await asyncio.sleep(RESTART_BACKOFF_S)

    async def _forget(self, engine: EngineProcess) -> None:
        """A dead engine leaves the view now; its record is deleted instead of waiting for the TTL."""
        self.registry.forget(engine.instance_id)
        if engine.address:
            await self.clients.drop(engine.address)
        asyncio.ensure_future(self._delete_record(engine.registry_key))

    async def _delete_record(self, key: str) -> None:
        """Deletes a dead engine's record, retrying while etcd is away: a restarted etcd renews
        every lease, so a record left behind would be routed to for a whole TTL after it returns."""
        delay = 0.5
        for _ in range(RECORD_DELETE_ATTEMPTS):
            try:
                await self.registry.client.delete(key)
                return
            except EtcdUnavailable as exc:
                log.warning("could not delete %s from etcd (%s); retrying in %.0f s", key, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        log.error("gave up deleting %s from etcd; its lease expires it", key)

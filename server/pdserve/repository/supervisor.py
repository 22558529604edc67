"""Starts, watches, restarts and stops engine worker processes, one per model instance.

A Deployment is the set of engines serving one version of one model under one config. Its
engines register in etcd as `standby`; the manager activates them (`ready`, routable) when the
whole deployment is up, and sets them `draining` before stopping them, so routers on every
node stop sending new requests while the ones in flight finish. An engine that dies while its
deployment serves is taken out of the registry at once and restarted.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from pdserve.cluster.registry import RegistryView
from pdserve.common import cpu_priority
from pdserve.common.records import DRAINING, READY, engine_key
from pdserve.cluster.engine_client import EngineClient, EngineClients
from pdserve.common.errors import Cause, ServeError, channel_closed_under_call
from pdserve.common.etcd import EtcdUnavailable
from pdserve.engine import bind_host
from pdserve.repository.config import DEFAULT_MAX_INFLIGHT_REQUESTS, InstanceSpec, ModelSpec
from pdserve.repository.planner import AUTO, Planner, PlannerSettings, initial_roles

log = logging.getLogger(__name__)

ENGINE_START_TIMEOUT_S = float(os.environ.get("PDSERVE_ENGINE_START_TIMEOUT", "300"))
RESTART_BACKOFF_S = 2.0
RECORD_DELETE_ATTEMPTS = 40   # about 6 minutes of retries


def engine_environment(host: str) -> dict[str, str]:
    """An engine's environment: this process's, with OpenMP's idle threads sleeping instead of
    spinning (OMP_WAIT_POLICY=PASSIVE) unless the operator chose a policy, and with wildcard
    binds confined to the advertise host (engine/bind_host.py: Mooncake's listeners).

    On a host where the front end, the worker's streaming thread and the clients share the
    engine's cores, spinning threads took the cores they need: through the server the engine ran
    at 0.61-0.68 of its in-process speed with spinning threads and 0.75-0.95 with PASSIVE
    (bench/RESULTS.md)."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(bind_host.environment(host, env))
    return env


# An engine that answers no Stats, or makes no progress with requests queued, for this long is
# taken for frozen (stuck step, SIGSTOP, deadlock): it is killed, which ends its streams with
# UNAVAILABLE, and restarted.
ENGINE_STALL_S = float(os.environ.get("PDSERVE_ENGINE_STALL_TIMEOUT", "20"))
# A stall of the front end itself (SIGSTOP, a paused VM, a starved SCHED_IDLE front end) stops its
# Stats polls too, so what it knows when it resumes says nothing about the engines: the monitor
# waits for fresh answers before it judges them again.
MONITOR_TICK_S = 0.25
MONITOR_LATE_S = 2.0      # a tick this much late: the front end itself was not running
STATS_REFRESH_S = 5.0     # what the Stats polls (every second, 2 s timeout) need to catch up


class EngineStartError(RuntimeError):
    pass


@dataclass
class ClusterSettings:
    etcd_endpoints: list[str]
    cluster: str = "default"
    node: str = ""
    lease_ttl: int = 10
    token_file: str = ""      # the cluster secret's file ("": no secret), handed to engines by path
    etcd_security: dict = field(default_factory=dict)   # EtcdSecurity.to_spec(): file paths, no secrets


class EngineProcess:
    def __init__(self, spec: ModelSpec, version: int, instance: InstanceSpec, host: str, run_dir: str,
                 cluster: ClusterSettings, clients: EngineClients, role: str = ""):
        self._args = (spec, version, instance, host, run_dir, cluster, clients)
        self.model = spec.name
        self.version = version
        self.instance = instance
        # The role it serves now: the group's, or for an AUTO instance the one the planner gave it.
        self.role = role or instance.role
        self.instance_id = f"{spec.name}-v{version}-{instance.name}-{uuid.uuid4().hex[:8]}"
        kv_transport = spec.engine_parameters.get("kv_transport", "")
        if instance.role == AUTO and not kv_transport:
            kv_transport = "mooncake"   # an AUTO engine may be switched to either side of PD
        self.spec = {"instance_id": self.instance_id, "model": spec.name, "version": str(version),
                     "role": self.role, "host": host, "engine": spec.engine_config(version, instance.device).to_dict(),
                     "kv_transport": kv_transport,
                     "etcd_endpoints": cluster.etcd_endpoints, "cluster": cluster.cluster, "node": cluster.node,
                     "lease_ttl": cluster.lease_ttl, "cluster_token_file": cluster.token_file,
                     "etcd_security": cluster.etcd_security}
        self.cluster = cluster
        self.clients = clients
        self.ready_file = os.path.join(run_dir, f"{self.instance_id}.ready")
        self.log_file = os.path.join(run_dir, f"{self.instance_id}.log")
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.client: EngineClient | None = None
        self.ready_at = 0.0
        self.stopping = False

    @property
    def registry_key(self) -> str:
        return engine_key(self.cluster.cluster, self.model, self.instance_id)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def replacement(self) -> "EngineProcess":
        """The same instance in its current role, to start anew (a new instance id and incarnation)."""
        return EngineProcess(*self._args, role=self.role)

    def _log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-lines:])
        except OSError:
            return ""

    async def start(self) -> None:
        where = f"instance {self.instance.name} on {self.instance.device}"
        # off the event loop: the first start compiles the bind shim, and a host name is resolved
        env = await asyncio.get_running_loop().run_in_executor(None, engine_environment, self.spec["host"])
        with open(self.log_file, "ab") as logf:   # from the spawner thread: at normal CPU priority
            self.proc = await cpu_priority.spawn_engine(
                self.instance.device,
                [sys.executable, "-m", "pdserve.engine.worker", "--spec-json", json.dumps(self.spec),
                 "--ready-file", self.ready_file],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if os.path.exists(self.ready_file):
                with open(self.ready_file) as f:
                    info = json.load(f)
                if "error" in info:
                    await self.stop()
                    raise EngineStartError(f"{where}: {info['error']}")
                self.address = info["address"]
                self.client = self.clients.get(self.address)
                self.ready_at = time.monotonic()
                return
            if self.proc.poll() is not None:
                raise EngineStartError(f"{where} exited with code {self.proc.returncode}: {self._log_tail()}")
            await asyncio.sleep(0.1)
        await self.stop()
        raise EngineStartError(f"{where} was not ready within {ENGINE_START_TIMEOUT_S:.0f} s (PDSERVE_ENGINE_START_TIMEOUT)")

    async def set_state(self, state: str, role: str = "") -> None:
        """The routing state in the engine's record, and a new role with it (AUTO instances)."""
        await self.client.set_state(state, role)
        if role:
            self.role = role

    def stalled(self, limit_s: float) -> str:
        """Why the engine looks frozen ("" when it does not)."""
        if self.client is None:
            return ""
        client = self.clients.figures(self.address)   # the load plane's last Stats answer (cluster/load.py)
        silent = time.monotonic() - (client.last_stats_at or self.ready_at)
        if silent > limit_s:
            return f"no Stats answer for {silent:.0f} s"
        if client.last_stats is not None and client.last_stats.seconds_since_progress > limit_s:
            return f"no progress for {client.last_stats.seconds_since_progress:.0f} s with requests queued"
        return ""

    async def idle(self) -> bool:
        """True when the engine holds no request (asks it; a dead engine is idle)."""
        try:
            s = await self.client.stats()
        except Exception:
            return True
        except asyncio.CancelledError:
            if not channel_closed_under_call():
                raise
            return True     # the engine is gone
        return s.num_running + s.num_waiting + s.num_awaiting_kv == 0

    async def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        if self.address:
            await self.clients.drop(self.address)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # graceful: the engine revokes its lease
            end = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < end:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.ready_file):
            os.remove(self.ready_file)


@dataclass
class Deployment:
    """The engines of one model version under one config generation."""
    spec: ModelSpec
    version: int
    engines: list[EngineProcess]
    supervisor: "Supervisor"
    inflight: int = 0
    active: bool = False
    _monitor: asyncio.Task | None = field(default=None, repr=False)
    planner: Planner | None = field(default=None, repr=False)   # AUTO instances' roles (two or more)

    @property
    def name(self) -> str:
        return self.spec.name

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

    async def start(self) -> None:
        results = await asyncio.gather(*(e.start() for e in self.engines), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise EngineStartError("; ".join(str(e) for e in errors))

    async def activate(self) -> None:
        """Makes the engines routable cluster-wide and starts restarting any that die."""
        await asyncio.gather(*(e.set_state(READY) for e in self.engines))
        await self.supervisor.wait_in_view(self.instance_ids, READY)
        self.active = True
        self._monitor = asyncio.ensure_future(self.supervisor.monitor(self))
        if sum(e.instance.role == AUTO for e in self.engines) >= 2:
            self.planner = Planner(self, PlannerSettings.from_parameters(self.spec.engine_parameters))
            self.planner.start()

    async def _stop_planner(self) -> None:
        if self.planner is not None:
            await self.planner.stop()

    async def drain(self, timeout: float) -> None:
        """Stops new routing here, then waits for the requests already routed to finish."""
        self.active = False
        await self._stop_planner()
        await asyncio.gather(*(e.set_state(DRAINING) for e in self.engines if e.alive), return_exceptions=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.inflight == 0 and all(await asyncio.gather(*(e.idle() for e in self.engines))):
                return
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self.active = False
        if self._monitor is not None:
            self._monitor.cancel()
        await self._stop_planner()
        await asyncio.gather(*(e.stop() for e in self.engines), return_exceptions=True)


class Supervisor:
    def __init__(self, host: str, run_dir: str, cluster: ClusterSettings, clients: EngineClients,
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
        tick = judge_from = time.monotonic()
        while dep.active:
            await asyncio.sleep(MONITOR_TICK_S)
            now = time.monotonic()
            if now - tick > MONITOR_TICK_S + MONITOR_LATE_S:
                judge_from = now + STATS_REFRESH_S
                log.warning("the front end itself stood still for %.1f s; engine stalls are judged again once "
                            "their Stats answers are fresh", now - tick - MONITOR_TICK_S)
            tick = now
            for i, engine in enumerate(list(dep.engines)):
                if engine.stopping or not dep.active:
                    continue
                if engine.alive:
                    why = engine.stalled(ENGINE_STALL_S) if now >= judge_from else ""
                    if not why:
                        continue
                    log.error("engine %s (%s %s) looks frozen (%s): killing it", engine.instance_id, dep.name,
                              engine.role, why)
                    engine.proc.kill()
                    engine.proc.wait()
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

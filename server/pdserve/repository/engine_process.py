"""One engine worker process: its spawn, its ready handshake, its stop, and the stall watchdog.

The supervisor starts `python -m pdserve.engine.worker` with the instance's WorkerSpec and the
write end of a pipe (engine/spec.py); the worker answers one JSON line on it, its address or why
it could not start, and the supervisor awaits that line for at most PDSERVE_ENGINE_START_TIMEOUT
seconds. A worker that dies first closes the pipe: its exit code and the tail of its log are the
reason given.

The watchdog judges from the load plane's Stats answers (cluster/load.py): an engine that
answers none, or makes no progress with requests queued, for PDSERVE_ENGINE_STALL_TIMEOUT
seconds is taken for frozen (a stuck step, SIGSTOP, a deadlock), and its deployment kills and
restarts it (repository/supervisor.py).
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from pdserve.cluster.engine_client import EngineClient
from pdserve.cluster.load import LoadPlane
from pdserve.common import cpu_priority
from pdserve.common.errors import channel_closed_under_call
from pdserve.common.etcd import EtcdSecurity
from pdserve.common.records import engine_key
from pdserve.engine import bind_host
from pdserve.engine.spec import WorkerSpec, read_answer
from pdserve.repository.config import InstanceSpec, ModelSpec

ENGINE_START_TIMEOUT_S = float(os.environ.get("PDSERVE_ENGINE_START_TIMEOUT", "300"))
EXIT_WAIT_S = 5.0     # after the ready pipe closed without a line: for the exit code

# An engine that answers no Stats, or makes no progress with requests queued, for this long is
# taken for frozen: it is killed, which ends its streams with UNAVAILABLE, and restarted.
ENGINE_STALL_S = float(os.environ.get("PDSERVE_ENGINE_STALL_TIMEOUT", "20"))
# A stall of the front end itself (SIGSTOP, a paused VM, a starved SCHED_IDLE front end) stops its
# Stats polls too, so what it knows when it resumes says nothing about the engines: the watchdog
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
    # the Mooncake master of engines with kv_store (common/mooncake_master.py: KVStoreMasters.endpoint)
    kv_store: Callable[[], Awaitable[str]] | None = None


def engine_environment(host: str) -> dict[str, str]:
    """An engine's environment: this process's, with OpenMP's idle threads sleeping instead of
    spinning (OMP_WAIT_POLICY=PASSIVE) unless the operator chose a policy, and with wildcard
    binds confined to the advertise host (engine/bind_host.py: Mooncake's listeners).

    The front end, the worker's streaming thread and the clients share the engine's cores;
    spinning threads would take the cores they need (bench/RESULTS.md)."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(bind_host.environment(host, env))
    return env


def stall_reason(now: float, ready_at: float, stats_at: float, seconds_since_progress: float | None,
                 limit_s: float) -> str:
    """Why an engine looks frozen ("" when it does not): no Stats answer since `stats_at` (0:
    none since it became ready at `ready_at`), or the engine's own count of seconds without
    progress with requests queued (None: no answer yet)."""
    silent = now - (stats_at or ready_at)
    if silent > limit_s:
        return f"no Stats answer for {silent:.0f} s"
    if seconds_since_progress is not None and seconds_since_progress > limit_s:
        return f"no progress for {seconds_since_progress:.0f} s with requests queued"
    return ""


class Watchdog:
    """When engine stalls may be judged: not until the Stats polls have caught up after the
    front end itself stood still. tick() once per MONITOR_TICK_S sleep."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, tick_s: float = MONITOR_TICK_S,
                 late_s: float = MONITOR_LATE_S, refresh_s: float = STATS_REFRESH_S):
        self.clock, self.tick_s, self.late_s, self.refresh_s = clock, tick_s, late_s, refresh_s
        self.last_tick = self.judge_from = clock()

    def tick(self) -> float:
        """The seconds the front end stood still before this tick (0: it ran on time)."""
        now = self.clock()
        late = now - self.last_tick - self.tick_s
        self.last_tick = now
        if late > self.late_s:
            self.judge_from = now + self.refresh_s
            return late
        return 0.0

    def judging(self) -> bool:
        return self.clock() >= self.judge_from


class EngineProcess:
    def __init__(self, spec: ModelSpec, version: int, instance: InstanceSpec, host: str, run_dir: str,
                 cluster: ClusterSettings, clients: LoadPlane, role: str = ""):
        self._args = (spec, version, instance, host, run_dir, cluster, clients)
        self.model = spec.name
        self.version = version
        self.instance = instance
        # The role it serves now: the group's, or for an AUTO instance the one the planner gave it.
        self.role = role or instance.role
        self.instance_id = f"{spec.name}-v{version}-{instance.name}-{uuid.uuid4().hex[:8]}"
        self.spec = WorkerSpec(
            instance_id=self.instance_id, model=spec.name, version=str(version), role=self.role, host=host,
            engine=spec.engine_config(version, instance.device), kv_transport=spec.kv_transport(instance.role),
            etcd_endpoints=tuple(cluster.etcd_endpoints), cluster=cluster.cluster, node=cluster.node,
            lease_ttl=cluster.lease_ttl, cluster_token_file=cluster.token_file,
            etcd_security=EtcdSecurity.from_spec(cluster.etcd_security), devices=instance.devices)
        self.cluster = cluster
        self.clients = clients
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
        where = f"instance {self.instance.name} on {', '.join(self.instance.ranks)}"
        engine = self.spec.engine
        if engine.kv_store == "mooncake" and not engine.kv_store_endpoint and self.cluster.kv_store is not None:
            engine.kv_store_endpoint = await self.cluster.kv_store()
        # off the event loop: the first start compiles the bind shim, and a host name is resolved
        env = await asyncio.get_running_loop().run_in_executor(None, engine_environment, self.spec.host)
        read_end, write_end = os.pipe()
        try:
            with open(self.log_file, "ab") as logf:   # from the spawner thread: at normal CPU priority
                self.proc = await cpu_priority.spawn_engine(
                    self.instance.device,
                    [sys.executable, "-m", "pdserve.engine.worker", "--spec-json", self.spec.to_json(),
                     "--ready-fd", str(write_end)],
                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, pass_fds=(write_end,))
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)   # the engine holds the only write end: its exit closes the pipe
        line = await _read_line(read_end, ENGINE_START_TIMEOUT_S)
        if line is None:
            await self.stop()
            raise EngineStartError(f"{where} was not ready within {ENGINE_START_TIMEOUT_S:.0f} s "
                                   f"(PDSERVE_ENGINE_START_TIMEOUT): {self._log_tail()}")
        if not line:
            code = await _exit_code(self.proc, EXIT_WAIT_S)
            await self.stop()
            raise EngineStartError(f"{where} exited with code {'?' if code is None else code}: {self._log_tail()}")
        self.address, error = read_answer(line)
        if error:
            await self.stop()
            raise EngineStartError(f"{where}: {error}")
        self.client = self.clients.get(self.address)
        self.ready_at = time.monotonic()

    async def set_state(self, state: str, role: str = "") -> None:
        """The routing state in the engine's record, and a new role with it (AUTO instances)."""
        await self.client.set_state(state, role)
        if role:
            self.role = role

    def stalled(self, limit_s: float = ENGINE_STALL_S) -> str:
        """Why the engine looks frozen ("" when it does not)."""
        if self.client is None:
            return ""
        figures = self.clients.figures(self.address)   # the load plane's last Stats answer (cluster/load.py)
        stats = figures.last_stats
        return stall_reason(time.monotonic(), self.ready_at, figures.last_stats_at,
                            stats.seconds_since_progress if stats is not None else None, limit_s)

    async def held(self) -> int:
        """The requests the engine holds: running, waiting, awaiting KV or open in its RPC."""
        s = await self.client.stats()
        return s.num_running + s.num_waiting + s.num_awaiting_kv + s.num_open_requests

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
            if await _exit_code(self.proc, timeout) is None:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """At once (a frozen engine): its streams end with UNAVAILABLE."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


async def _read_line(fd: int, timeout: float) -> bytes | None:
    """One line from the read end of a pipe, which it closes: b"" when the pipe closed without
    one, None past the timeout."""
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    try:
        return await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        transport.close()


async def _exit_code(proc: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit code once it exits, None if it still runs after timeout seconds."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        await asyncio.sleep(0.05)
    return proc.returncode

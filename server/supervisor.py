"""Starts, watches and stops engine worker processes, one per model instance.

A Deployment is the set of engines serving one version of one model under one config;
a reload builds a new Deployment beside the old one and the old is drained then stopped.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

from pdserve.frontend.engine_client import EngineClient
from pdserve.repository.config import InstanceSpec, ModelSpec

log = logging.getLogger(__name__)

ENGINE_START_TIMEOUT_S = float(os.environ.get("PDSERVE_ENGINE_START_TIMEOUT", "300"))
_generation = itertools.count(1)


class EngineStartError(RuntimeError):
    pass


class EngineProcess:
    def __init__(self, model: str, version: int, instance: InstanceSpec, spec: ModelSpec, host: str, run_dir: str):
        self.model = model
        self.version = version
        self.instance = instance
        self.instance_id = f"{model}-v{version}-{instance.name}-{uuid.uuid4().hex[:8]}"
        self.host = host
        self.engine_config = spec.engine_config(version, instance.device)
        self.ready_file = os.path.join(run_dir, f"{self.instance_id}.ready")
        self.log_file = os.path.join(run_dir, f"{self.instance_id}.log")
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.client: EngineClient | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-lines:])
        except OSError:
            return ""

    async def start(self) -> None:
        spec = {"instance_id": self.instance_id, "model": self.model, "version": str(self.version),
                "role": self.instance.role, "host": self.host, "engine": self.engine_config.to_dict()}
        with open(self.log_file, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pdserve.engine.worker", "--spec-json", json.dumps(spec),
                 "--ready-file", self.ready_file], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if os.path.exists(self.ready_file):
                with open(self.ready_file) as f:
                    info = json.load(f)
                if "error" in info:
                    await self.stop()
                    raise EngineStartError(f"instance {self.instance.name} on {self.instance.device}: {info['error']}")
                self.address = info["address"]
                self.client = EngineClient(self.address, self.instance_id, self.instance.role)
                return
            if self.proc.poll() is not None:
                raise EngineStartError(f"instance {self.instance.name} on {self.instance.device} exited with code "
                                       f"{self.proc.returncode}: {self._log_tail()}")
            await asyncio.sleep(0.1)
        await self.stop()
        raise EngineStartError(f"instance {self.instance.name} on {self.instance.device} was not ready within "
                               f"{ENGINE_START_TIMEOUT_S:.0f} s (PDSERVE_ENGINE_START_TIMEOUT)")

    async def stop(self, timeout: float = 10.0) -> None:
        if self.client is not None:
            await self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            end = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < end:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for path in (self.ready_file,):
            if os.path.exists(path):
                os.remove(path)


@dataclass
class Deployment:
    """The engines of one model version under one config generation."""
    spec: ModelSpec
    version: int
    engines: list[EngineProcess]
    generation: int = field(default_factory=lambda: next(_generation))
    inflight: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self) -> None:
        results = await asyncio.gather(*(e.start() for e in self.engines), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise EngineStartError("; ".join(str(e) for e in errors))

    async def drain(self, timeout: float) -> None:
        """Waits for the requests already routed here to finish (new ones go elsewhere)."""
        end = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines), return_exceptions=True)

    def live_engines(self, role: str | None = None) -> list[EngineProcess]:
        return [e for e in self.engines if e.client is not None and e.alive and (role is None or e.instance.role == role)]


class Supervisor:
    def __init__(self, host: str, run_dir: str):
        self.host = host
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)

    def deployment(self, spec: ModelSpec, version: int) -> Deployment:
        engines = [EngineProcess(spec.name, version, inst, spec, self.host, self.run_dir) for inst in spec.instances]
        return Deployment(spec, version, engines)

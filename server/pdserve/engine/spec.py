"""What the supervisor and an engine worker process exchange: the spec it starts with (one JSON
argument) and the one line it answers on its ready pipe.

    python -m pdserve.engine.worker --spec-json '{...}' --ready-fd N

The worker writes one JSON line to the inherited pipe end N, `{"address": "host:port"}` once it
serves or `{"error": "..."}` when it cannot start, and closes it; the supervisor awaits that line
(repository/engine_process.py). A worker that dies first closes the pipe without a line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pydantic import TypeAdapter

from pdserve.common.etcd import EtcdSecurity
from pdserve.common.records import DEFAULT_TTL_S
from pdserve.engine.config import EngineConfig

MAX_ERROR_CHARS = 8000   # the reader takes lines of up to 64 KiB; an error says enough before this


@dataclass(frozen=True)
class WorkerSpec:
    """One engine instance: who it is, where it serves, how it joins the cluster."""
    instance_id: str
    model: str
    version: str
    role: str                       # BOTH, PREFILL, DECODE (an AUTO instance's current role)
    host: str                       # the advertise host it binds and registers
    engine: EngineConfig
    kv_transport: str = "none"      # decided by the model's config (repository/config.py: ModelSpec.kv_transport)
    etcd_endpoints: tuple[str, ...] = ()   # none: the engine does not register (tests)
    cluster: str = "default"
    node: str = ""
    lease_ttl: int = DEFAULT_TTL_S
    cluster_token_file: str = ""    # the cluster secret's file ("": none); the secret never travels in the spec
    etcd_security: EtcdSecurity = EtcdSecurity()   # file paths only
    # tensor parallelism: every rank's device, rank 0's (engine.device) first; (): one device
    devices: tuple[str, ...] = ()

    def to_json(self) -> str:
        return _ADAPTER.dump_json(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> "WorkerSpec":
        """Raises pydantic.ValidationError for a spec that is not one."""
        return _ADAPTER.validate_json(text)


_ADAPTER = TypeAdapter(WorkerSpec)


class ReadyPipe:
    """The worker's end of the start-up handshake: answers once, then the pipe is closed."""

    def __init__(self, fd: int):
        os.set_inheritable(fd, False)   # no process the engine starts may keep the supervisor waiting
        self.fd: int | None = fd

    def send(self, payload: dict) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (json.dumps(payload) + "\n").encode())
        except OSError:
            pass    # the supervisor is gone; the parent-death signal ends this process
        finally:
            os.close(self.fd)
            self.fd = None

    def ready(self, address: str) -> None:
        self.send({"address": address})

    def failed(self, error: str) -> None:
        self.send({"error": error[:MAX_ERROR_CHARS]})


def read_answer(line: bytes) -> tuple[str, str]:
    """(address, error) from the worker's ready line; a line that is not one is an error."""
    try:
        answer = json.loads(line)
        if isinstance(answer, dict) and isinstance(answer.get("address"), str) and answer["address"]:
            return answer["address"], ""
        if isinstance(answer, dict) and "error" in answer:
            return "", str(answer["error"])
    except ValueError:
        pass
    return "", f"an unreadable ready line: {line[:200]!r}"

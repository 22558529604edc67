"""The engine record in etcd: what an engine publishes about itself and every front end reads.

Key layout (documented in docs/cluster.md):
    /pdserve/<cluster>/engines/<model>/<instance_id>  ->  JSON EngineRecord, attached to the
                                                          engine's own lease
The writer is engine/registration.py, the readers cluster/registry.py. Each start of an engine
process has a fresh instance id (so a fresh key) and incarnation id: records of a former self
are never taken for the new one.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import asdict, dataclass, field

from pdserve.common.cluster_auth import signature, verify

STANDBY, READY, DRAINING = "standby", "ready", "draining"
DEFAULT_TTL_S = 10


def engines_prefix(cluster: str) -> str:
    return f"/pdserve/{cluster}/engines/"


def engine_key(cluster: str, model: str, instance_id: str) -> str:
    return f"{engines_prefix(cluster)}{model}/{instance_id}"


@dataclass
class EngineRecord:
    instance_id: str
    model: str
    version: str
    role: str                 # BOTH, PREFILL, DECODE
    device: str
    node: str
    address: str              # engine RPC host:port
    state: str = STANDBY      # standby (starting), ready (routable), draining (finishing its requests)
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    kv_transport: dict = field(default_factory=dict)   # the transport's handshake data
    capacity: dict = field(default_factory=dict)       # num_blocks, block_size, max_model_len, max_num_seqs
    started: float = field(default_factory=time.time)
    pid: int = 0
    signature: str = ""       # HMAC of the other fields under the cluster secret (common/cluster_auth.py)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def signed_json(self, token: str) -> bytes:
        """The record as written to etcd: signed when the cluster has a secret."""
        if token:
            self.signature = signature(asdict(self), token)
        return self.to_json()

    @classmethod
    def from_json(cls, data: bytes, token: str = "") -> "EngineRecord":
        """Fields a newer pdserve adds are ignored (and covered by the signature); a record
        missing required fields, or not signed with the cluster's secret, raises ValueError."""
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise ValueError("an engine record must be a JSON object")
        if token and not verify(fields, token):
            raise ValueError("its signature does not verify with this cluster's secret")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

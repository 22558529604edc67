"""The records in etcd: what engines and nodes publish and every front end reads.

Key layout (documented in docs/cluster.md):
    /pdserve/<cluster>/engines/<model>/<instance_id>  ->  JSON EngineRecord, attached to the
                                                          engine's own lease
    /pdserve/<cluster>/models/<model>/<version>/<node> ->  JSON ModelRecord: the config of a model
                                                          version a node serves, on the node's lease
    /pdserve/<cluster>/kv_store/mooncake             ->  JSON KVStoreRecord: the cluster's Mooncake
                                                          master, on the lease of the node running it
Engine records are written by engine/registration.py, model records by cluster/publisher.py;
both are read by cluster/registry.py. Each start of an engine process has a fresh instance id
(so a fresh key) and incarnation id: records of a former self are never taken for the new one.
Every record is signed with the cluster secret when the cluster has one.
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


def cluster_prefix(cluster: str) -> str:
    return f"/pdserve/{cluster}/"


def engines_prefix(cluster: str) -> str:
    return f"{cluster_prefix(cluster)}engines/"


def models_prefix(cluster: str) -> str:
    return f"{cluster_prefix(cluster)}models/"


def kv_store_key(cluster: str) -> str:
    return f"{cluster_prefix(cluster)}kv_store/mooncake"


def engine_key(cluster: str, model: str, instance_id: str) -> str:
    return f"{engines_prefix(cluster)}{model}/{instance_id}"


def model_key(cluster: str, model: str, version: str, node: str) -> str:
    return f"{models_prefix(cluster)}{model}/{version}/{node}"


class SignedRecord:
    """JSON in etcd, with an HMAC of its fields under the cluster secret (common/cluster_auth.py)."""
    signature: str

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def signed_json(self, token: str) -> bytes:
        """The record as written to etcd: signed when the cluster has a secret."""
        if token:
            self.signature = signature(asdict(self), token)
        return self.to_json()

    @classmethod
    def from_json(cls, data: bytes, token: str = ""):
        """Fields a newer pdserve adds are ignored (and covered by the signature); a record
        missing required fields, or not signed with the cluster's secret, raises ValueError."""
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise ValueError("a record must be a JSON object")
        if token and not verify(fields, token):
            raise ValueError("its signature does not verify with this cluster's secret")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})


@dataclass
class EngineRecord(SignedRecord):
    instance_id: str
    model: str
    version: str
    role: str                 # BOTH, PREFILL, DECODE
    device: str
    node: str
    address: str              # engine RPC host:port
    state: str = STANDBY      # standby (starting), ready (routable), draining (finishing its requests)
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    capacity: dict = field(default_factory=dict)       # num_blocks, block_size, max_model_len, max_num_seqs
    started: float = field(default_factory=time.time)
    pid: int = 0
    signature: str = ""       # HMAC of the other fields under the cluster secret (common/cluster_auth.py)


@dataclass
class ModelRecord(SignedRecord):
    """A model version one node serves from its repository, as ModelConfig answers it: any node
    of the cluster (a router-only node among them) serves the model from it and the engines."""
    model: str
    version: str
    node: str                 # the node that serves it (--node-name)
    config: dict              # the ModelConfig, as protobuf JSON with the proto's field names
    state: str = "READY"      # Triton's state of the version on that node (published while READY)
    published: float = field(default_factory=time.time)
    files: dict = field(default_factory=dict)   # tokenizer file name -> SHA-256 of it (cluster/model_files.py)
    signature: str = ""

    def __post_init__(self):
        if not isinstance(self.config, dict) or not isinstance(self.files, dict):
            raise ValueError("a model record's config and files must be JSON objects")


@dataclass
class KVStoreRecord(SignedRecord):
    """The cluster's KV store master (common/mooncake_master.py), as the node that runs it published it."""
    kind: str                 # mooncake
    master: str               # host:port of its RPC
    node: str
    signature: str = ""

"""Reads and validates one model folder: config.pbtxt plus numeric version folders.

Every error names the file, the field and the fix, because an operator reads it in
RepositoryIndex or the log without the code at hand.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from google.protobuf import json_format, text_format

from pdserve._proto import model_config_pb2 as mc
from pdserve.engine.config import DTYPES, QUANTIZATIONS, EngineConfig
from pdserve.common.devices import DeviceError, parse_device
from pdserve.engine.parallel import SHARDED_MODEL_TYPES, check_divisible
from pdserve.repository.planner import PlannerSettings

CONFIG_FILE = "config.pbtxt"
ROLES = ("BOTH", "PREFILL", "DECODE", "AUTO")
BACKENDS = ("", "pdserve", "vllm")

# The tensor interface of Triton's vLLM backend, declared once: (name, KServe datatype, optional).
# frontend/tensors.py parses requests by it; complete_config() writes it into ModelConfig.
INPUTS = [("text_input", "BYTES", False), ("stream", "BOOL", True), ("sampling_parameters", "BYTES", True),
          ("exclude_input_in_output", "BOOL", True), ("return_finish_reason", "BOOL", True),
          ("return_num_input_tokens", "BOOL", True), ("return_num_output_tokens", "BOOL", True),
          ("return_logprobs", "BOOL", True)]
OUTPUTS = [("text_output", "BYTES"), ("finish_reason", "BYTES"), ("num_input_tokens", "UINT32"),
           ("num_output_tokens", "UINT32"), ("logprobs", "BYTES")]
# KServe datatype <-> ModelConfig data type.
CONFIG_DATATYPES = {"BYTES": mc.TYPE_STRING, "BOOL": mc.TYPE_BOOL, "UINT32": mc.TYPE_UINT32}
KSERVE_DATATYPES = {v: k for k, v in CONFIG_DATATYPES.items()}

# config.pbtxt `parameters` that set engine options, with their types.
ENGINE_PARAMETERS = {f.name: f.type for f in dataclasses.fields(EngineConfig) if f.name not in ("model_path", "device")}
# Parameters read outside the engine's EngineConfig: the transport, the front end's admission
# limit per model version (requests in flight from one node), and how many times a request may
# move to another engine when its engine dies mid-stream (0: never, as Dynamo's default), and
# the tokens per streamed response after the first (vLLM's --stream-interval; 1: every token), and
# the longest uncached prompt a DECODE engine computes itself instead of handing it off (0: only
# a prompt it caches whole).
NODE_PARAMETERS = {"kv_transport": "str", "max_inflight_requests": "int", "migration_limit": "int",
                   "stream_interval": "int", "max_local_prefill_tokens": "int"}
# The planner of AUTO instances (repository/planner.py, docs/cluster.md "Elastic roles").
PLANNER_PARAMETERS = PlannerSettings.parameters()
NODE_PARAMETERS.update(PLANNER_PARAMETERS)
ENGINE_PARAMETERS.update(NODE_PARAMETERS)
DEFAULT_MAX_INFLIGHT_REQUESTS = 1024


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class InstanceSpec:
    group: str
    index: int
    role: str
    device: str                     # rank 0's device
    devices: tuple[str, ...] = ()   # tensor parallelism: every rank's device, rank 0's first (): device alone

    @property
    def name(self) -> str:
        return f"{self.group}_{self.index}"

    @property
    def ranks(self) -> tuple[str, ...]:
        return self.devices or (self.device,)


@dataclass
class ModelSpec:
    name: str
    path: str
    config: mc.ModelConfig
    versions: list[int]
    instances: list[InstanceSpec]
    engine_parameters: dict = field(default_factory=dict)

    def engine_config(self, version: int, device: str) -> EngineConfig:
        params = {k: v for k, v in self.engine_parameters.items() if k not in NODE_PARAMETERS}
        return EngineConfig(model_path=os.path.join(self.path, str(version)), device=device, **params)

    def kv_transport(self, role: str) -> str:
        """The KV transport of an instance in a role (its group's, AUTO included): the
        `kv_transport` parameter, else mooncake for the roles of PD (an AUTO engine may switch
        to either side) and none for BOTH. The one place this default is decided."""
        return self.engine_parameters.get("kv_transport") or ("none" if role == "BOTH" else "mooncake")


def fingerprint(model_dir: str) -> str:
    """Changes whenever config.pbtxt or any file of a version folder changes."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            digest.update(f"{os.path.relpath(path, model_dir)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def version_folders(model_dir: str) -> list[int]:
    return sorted(int(d) for d in os.listdir(model_dir) if d.isdigit() and os.path.isdir(os.path.join(model_dir, d)))


def _parse(path: str) -> mc.ModelConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found; every model folder needs a config.pbtxt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}; fix the protobuf text format (fields of protos/model_config.proto)") from exc
    return config


def _select_versions(path: str, config: mc.ModelConfig, available: list[int]) -> list[int]:
    if not available:
        raise ConfigError(f"{path}: no numeric version folder beside it; put the model files in {os.path.dirname(path)}/1/")
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "all":
        return available
    if policy == "specific":
        wanted = sorted(set(config.version_policy.specific.versions))
        missing = [v for v in wanted if v not in available]
        if missing:
            raise ConfigError(f"{path}: version_policy.specific lists versions {missing} that have no folder; "
                              f"available: {available}")
        return wanted
    num = config.version_policy.latest.num_versions if policy == "latest" else 1
    if num < 1:
        raise ConfigError(f"{path}: version_policy.latest.num_versions must be at least 1")
    return available[-num:]


def _group_devices(path: str, i: int, group: mc.ModelInstanceGroup) -> list[str]:
    where = f"{path}: instance_group[{i}]"
    if group.devices:
        devices = list(group.devices)
    elif group.kind == mc.ModelInstanceGroup.KIND_GPU:
        devices = [f"cuda:{g}" for g in group.gpus] or ["cuda:0"]
    elif group.kind == mc.ModelInstanceGroup.KIND_NPU:
        devices = [f"npu:{g}" for g in group.gpus] or ["npu:0"]
    else:
        devices = ["cpu"]
    for device in devices:
        try:
            parse_device(device)
        except DeviceError as exc:
            raise ConfigError(f"{where}.devices: {exc}") from exc
    if group.count < 0:
        raise ConfigError(f"{where}.count is {group.count}; use a positive count of instances per device")
    return devices


def _tensor_parallel_runs(path: str, i: int, group: mc.ModelInstanceGroup, devices: list[str]) -> list[tuple[str, ...]]:
    """The group's instances' devices: each tensor_parallel_size consecutive devices form one."""
    where = f"{path}: instance_group[{i}]"
    size = group.tensor_parallel_size or 1
    if size < 1:
        raise ConfigError(f"{where}.tensor_parallel_size is {size}; use 1 (one device per instance) or more")
    if len(devices) % size:
        raise ConfigError(f"{where}.tensor_parallel_size is {size} but devices lists {len(devices)}; list a multiple "
                          f"of {size} devices (each {size} consecutive devices form one instance) or change the size")
    kinds = sorted({parse_device(d).kind for d in devices})
    if size > 1 and len(kinds) > 1:
        raise ConfigError(f"{where}.devices mixes {' and '.join(kinds)}; the ranks of a tensor_parallel_size {size} "
                          "instance must be devices of one kind: put each kind in its own instance_group")
    return [tuple(devices[start:start + size]) for start in range(0, len(devices), size)]


def _check_tensor_parallel(path: str, config: mc.ModelConfig, versions: list[int]) -> None:
    """A size > 1 needs a family that shards and heads it divides (each version's config.json;
    one that cannot be read is left to the engine, which names what is wrong with it)."""
    sizes = {i: g.tensor_parallel_size for i, g in enumerate(config.instance_group) if g.tensor_parallel_size > 1}
    for version in versions if sizes else ():
        try:
            with open(os.path.join(os.path.dirname(path), str(version), "config.json")) as f:
                hf = json.load(f)
        except (OSError, ValueError):
            continue
        model_type = hf.get("model_type", "")
        for i, size in sizes.items():
            where = f"{path}: instance_group[{i}].tensor_parallel_size is {size}"
            if model_type not in SHARDED_MODEL_TYPES:
                raise ConfigError(f"{where} but version {version} is model_type '{model_type}'; tensor parallelism "
                                  f"shards {', '.join(SHARDED_MODEL_TYPES)}: use tensor_parallel_size 1")
            heads = hf.get("num_attention_heads", 0)
            why = check_divisible(size, heads, hf.get("num_key_value_heads") or heads)
            if why:
                raise ConfigError(f"{where} (version {version}): {why}")


def _group_name(config: mc.ModelConfig, i: int, group: mc.ModelInstanceGroup) -> str:
    return f"{config.name}_{mc.ModelInstanceGroup.Role.Name(group.role).lower()}_{i}"


def _instances(path: str, config: mc.ModelConfig) -> list[InstanceSpec]:
    groups = list(config.instance_group) or [mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU)]
    instances = []
    for i, group in enumerate(groups):
        role = mc.ModelInstanceGroup.Role.Name(group.role)
        name = group.name or _group_name(config, i, group)
        for ranks in _tensor_parallel_runs(path, i, group, _group_devices(path, i, group)):
            for _ in range(group.count or 1):
                instances.append(InstanceSpec(name, len([s for s in instances if s.group == name]), role, ranks[0],
                                              ranks if len(ranks) > 1 else ()))
    # A node may host only PREFILL instances: their DECODE partners can run on other nodes.
    return instances


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


def _engine_parameters(path: str, config: mc.ModelConfig) -> dict:
    params = {}
    for key, value in config.parameters.items():
        if key not in ENGINE_PARAMETERS:
            raise ConfigError(f"{path}: parameters key '{key}' is unknown; known keys: {', '.join(sorted(ENGINE_PARAMETERS))}")
        kind = ENGINE_PARAMETERS[key]
        text = value.string_value.strip()
        try:
            params[key] = {"int": int, "float": float, "str": str, "bool": _parse_bool}[kind](text)
        except ValueError as exc:
            article = "an" if kind == "int" else "a"
            raise ConfigError(f"{path}: parameters '{key}' is '{text}'; it must be {article} {kind}"
                              + (" (true or false)" if kind == "bool" else "")) from exc
        if kind in ("int", "float") and params[key] < 0 and (key, params[key]) != ("max_local_prefill_tokens", -1):
            raise ConfigError(f"{path}: parameters '{key}' is {text}; it cannot be negative"
                              + (" (-1: hand off every prompt)" if key == "max_local_prefill_tokens" else ""))
    if params.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"{path}: parameters 'dtype' is '{params['dtype']}'; use one of {', '.join(DTYPES)}")
    if params.get("quantization", "").lower() not in QUANTIZATIONS:
        raise ConfigError(f"{path}: parameters 'quantization' is '{params['quantization']}'; use int8, fp8 (GPUs of "
                          "compute capability 8.9+) or none")
    for key in ("kv_block_size", "max_num_batched_tokens", "max_num_seqs", "stream_interval"):
        if params.get(key, 1) < 1:
            raise ConfigError(f"{path}: parameters '{key}' must be at least 1")
    if params.get("kv_store", "") not in ("", "none", "mooncake"):
        raise ConfigError(f"{path}: parameters 'kv_store' is '{params['kv_store']}'; use mooncake (or none)")
    window = params.get("admission_window_ms", 0.0)
    if not 0.0 <= window <= 1000.0:   # also catches nan and inf
        raise ConfigError(f"{path}: parameters 'admission_window_ms' is {window}; use milliseconds from 0 to 1000")
    fraction = params.get("kv_cache_memory_fraction", 0.0)
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"{path}: parameters 'kv_cache_memory_fraction' is {fraction}; use a value in (0, 1]")
    return params


def _check_auto(path: str, instances: list[InstanceSpec], params: dict) -> None:
    """AUTO instances switch between PREFILL and DECODE, so they need a KV transport; the
    planner's low prompt-queue mark must sit below its high one."""
    if any(i.role == "AUTO" for i in instances) and params.get("kv_transport") == "none":
        raise ConfigError(f"{path}: role AUTO needs a KV transport, but parameters 'kv_transport' is 'none'; "
                          "drop it (AUTO engines default to mooncake) or set mooncake / mooncake:rdma")
    high = params.get("planner_prefill_queue_high", PlannerSettings.prefill_queue_high)
    if "planner_prefill_queue_low" in params and params["planner_prefill_queue_low"] >= high:
        raise ConfigError(f"{path}: parameters 'planner_prefill_queue_low' ({params['planner_prefill_queue_low']}) "
                          f"must be below 'planner_prefill_queue_high' (default {PlannerSettings.prefill_queue_high}), "
                          "or the roles flap")


def complete_config(config: mc.ModelConfig) -> None:
    """Fills in what Triton's vLLM backend would: the tensors and the decoupled policy."""
    if not config.backend:
        config.backend = "pdserve"
    if not config.input:
        for name, dtype, optional in INPUTS:
            config.input.add(name=name, data_type=CONFIG_DATATYPES[dtype], dims=[1], optional=optional)
    if not config.output:
        for name, dtype in OUTPUTS:
            config.output.add(name=name, data_type=CONFIG_DATATYPES[dtype], dims=[-1])
    config.model_transaction_policy.decoupled = True
    kinds = {"cpu": mc.ModelInstanceGroup.KIND_CPU, "cuda": mc.ModelInstanceGroup.KIND_GPU,
             "npu": mc.ModelInstanceGroup.KIND_NPU}
    if not config.instance_group:
        config.instance_group.add(devices=["cpu"])
    for i, group in enumerate(config.instance_group):
        group.name = group.name or _group_name(config, i, group)
        group.count = group.count or 1
        group.tensor_parallel_size = group.tensor_parallel_size or 1
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO and group.devices:
            group.kind = kinds[parse_device(group.devices[0]).kind]


def load_model_spec(model_dir: str) -> ModelSpec:
    """Parses and validates a model folder; raises ConfigError with an actionable message."""
    model_dir = os.path.abspath(model_dir)
    folder = os.path.basename(model_dir)
    path = os.path.join(model_dir, CONFIG_FILE)
    config = _parse(path)
    if config.name and config.name != folder:
        raise ConfigError(f"{path}: name is '{config.name}' but the folder is '{folder}'; make them equal or drop 'name'")
    config.name = folder
    if config.backend not in BACKENDS:
        raise ConfigError(f"{path}: backend '{config.backend}' is not served here; use backend: \"pdserve\"")
    versions = _select_versions(path, config, version_folders(model_dir))
    instances = _instances(path, config)
    _check_tensor_parallel(path, config, versions)
    params = _engine_parameters(path, config)
    _check_auto(path, instances, params)
    complete_config(config)
    return ModelSpec(folder, model_dir, config, versions, instances, params)


def config_to_json(config: mc.ModelConfig) -> dict:
    """The config as a node publishes it in etcd (protobuf JSON, the proto's field names)."""
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def published_spec(name: str, version: int, published: dict) -> ModelSpec:
    """A model version another node serves, from the config it published: what ModelConfig and
    ModelMetadata answer, and the parameters the front end itself reads (admission, migration).
    No folder and no instances: its engines are the other nodes'. Raises ConfigError."""
    try:
        config = json_format.ParseDict(published, mc.ModelConfig(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ConfigError(f"the config of '{name}' published in etcd cannot be read: {exc}") from exc
    mine = mc.ModelConfig()
    for key in NODE_PARAMETERS.keys() & config.parameters.keys():
        mine.parameters[key].CopyFrom(config.parameters[key])
    params = _engine_parameters(f"the config of '{name}' published in etcd", mine)
    return ModelSpec(name, "", config, [version], [], params)

"""Device strings of config.pbtxt ("cpu", "cpu:N", "cuda:N", "npu:N") to torch devices.

Device modules are imported only for the device asked for: torch_npu only for npu:N.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

_DEVICE_RE = re.compile(r"^(cpu|cuda|npu)(?::(\d+))?$")


class DeviceError(ValueError):
    pass


@dataclass(frozen=True)
class DeviceSpec:
    kind: str             # cpu, cuda, npu
    index: int | None     # cpu: the core to pin to; cuda/npu: the device ordinal

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(text: str) -> DeviceSpec:
    match = _DEVICE_RE.match(text.strip())
    if not match:
        raise DeviceError(f"device '{text}' is not one of cpu, cpu:N, cuda:N, npu:N")
    index = int(match.group(2)) if match.group(2) is not None else None
    return DeviceSpec(match.group(1), index)


def open_device(spec: DeviceSpec) -> torch.device:
    """Checks the device exists and makes it current; pins the process for cpu:N."""
    if spec.kind == "cpu":
        if spec.index is not None:
            cores = sorted(os.sched_getaffinity(0))
            if spec.index not in cores:
                raise DeviceError(f"device cpu:{spec.index} is not available: this host's usable cores are {cores}")
            os.sched_setaffinity(0, {spec.index})
            torch.set_num_threads(1)
        return torch.device("cpu")
    if spec.kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = spec.index or 0
        if index >= count:
            raise DeviceError(f"device cuda:{index} is not available: this host has {count} CUDA device(s)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    try:
        import torch_npu  # noqa: F401  (registers the npu device with torch)
    except ImportError as exc:
        raise DeviceError(f"device {spec} needs torch_npu (pip install 'pdserve[npu]' with Ascend CANN): {exc}") from exc
    index = spec.index or 0
    count = torch.npu.device_count()
    if index >= count:
        raise DeviceError(f"device npu:{index} is not available: this host has {count} NPU device(s)")
    torch.npu.set_device(index)
    return torch.device("npu", index)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return torch.npu.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

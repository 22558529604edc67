"""Opens the device an engine runs on; torch_npu is imported only for npu:N."""
from __future__ import annotations

import os

import torch

from pdserve.common.devices import DeviceError, DeviceSpec

__all__ = ["DeviceError", "open_device", "free_memory_bytes"]


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

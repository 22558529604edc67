"""Device strings of config.pbtxt ("cpu", "cpu:N", "cuda:N", "npu:N"), parsed without torch.

The front end validates configs with this; whether the device exists is checked by the
engine that opens it (engine/devices.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

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

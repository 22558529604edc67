"""Typed commands from the worker's asyncio side to the engine thread (as vLLM's EngineCoreRequestType).

The engine thread is the only one that touches the engine's state; everything else reaches it
through one of these, put on its inbox.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Union

from pdserve.common.errors import Cause
from pdserve.engine.kv_transport import KVDestination
from pdserve.engine.sequence import SamplingParams


class CommandType(enum.Enum):
    ADD = "add"                    # a request to generate for (DECODE/BOTH)
    ADD_PREFILL = "add_prefill"    # a prompt to compute and hand off (PREFILL)
    ABORT = "abort"                # the client went away
    PREFILL_ANSWER = "prefill_answer"  # DECODE: the prefill engine answered a handoff
    STOP = "stop"


@dataclass(frozen=True)
class AddRequest:
    type: ClassVar[CommandType] = CommandType.ADD
    request_id: str
    token_ids: tuple[int, ...]
    params: SamplingParams
    prefill_address: str = ""      # "": prefill here
    resume_token_ids: tuple[int, ...] = ()   # migration: output a former engine already sent
    prompt_block_hashes: tuple[int, ...] = ()  # the front end's hashes of the prompt's full blocks
    admitting: int = 0             # more requests the front end was admitting: a burst on its way


@dataclass(frozen=True)
class AddPrefill:
    type: ClassVar[CommandType] = CommandType.ADD_PREFILL
    request_id: str
    token_ids: tuple[int, ...]
    params: SamplingParams
    destination: KVDestination
    deadline: float


@dataclass(frozen=True)
class Abort:
    type: ClassVar[CommandType] = CommandType.ABORT
    request_id: str


@dataclass(frozen=True)
class PrefillAnswer:
    type: ClassVar[CommandType] = CommandType.PREFILL_ANSWER
    request_id: str
    first_token: int | None        # None: the handoff failed
    cause: Cause | None = None
    message: str = ""


@dataclass(frozen=True)
class Stop:
    type: ClassVar[CommandType] = CommandType.STOP


Command = Union[AddRequest, AddPrefill, Abort, PrefillAnswer, Stop]

"""Why a request failed, and the one table from each cause to its gRPC status and metric label.

Every layer raises ServeError(cause, message); the message says what to change. An engine
sends the cause of a failed engine RPC in the trailing metadata key CAUSE_KEY (the enum
member's name), so the front end never reads causes out of message text. As in Triton, the
status a client sees is decided in this one place.
"""
from __future__ import annotations

import asyncio
import enum

import grpc

CAUSE_KEY = "pdserve-cause"


class Cause(enum.Enum):
    #                         gRPC status                         failure label       KV handoff label
    INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument")
    INPUT_TOO_LARGE = (grpc.StatusCode.RESOURCE_EXHAUSTED, "invalid_argument")
    OVERLOADED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
    MODEL_UNKNOWN = (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument")
    MODEL_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "not_found")
    MODEL_NOT_READY = (grpc.StatusCode.UNAVAILABLE, "unavailable")
    MODEL_LOAD_FAILED = (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument")
    CONTROL_MODE = (grpc.StatusCode.UNAVAILABLE, "unavailable")
    NO_ENGINE = (grpc.StatusCode.UNAVAILABLE, "no_engine")
    ENGINE_FAILURE = (grpc.StatusCode.UNAVAILABLE, "engine_failure")
    KV_HANDOFF_TIMEOUT = (grpc.StatusCode.UNAVAILABLE, "kv_handoff", "timeout")
    KV_HANDOFF_PEER_LOST = (grpc.StatusCode.UNAVAILABLE, "kv_handoff", "prefill_engine_lost")
    KV_TRANSFER_ERROR = (grpc.StatusCode.UNAVAILABLE, "kv_handoff", "transfer_error")
    CANCELLED = (grpc.StatusCode.CANCELLED, "cancelled")
    DEADLINE_EXCEEDED = (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded")
    INTERNAL = (grpc.StatusCode.INTERNAL, "internal")

    def __new__(cls, status: grpc.StatusCode, failure_label: str, handoff_label: str = ""):
        # Every cause is its own member (no aliases), even where two share a status and labels.
        member = object.__new__(cls)
        member._value_ = len(cls.__members__)
        member.status = status                  # what a gRPC client sees
        member.failure_label = failure_label    # the `reason` label of nv_inference_request_failure
        member.handoff_label = handoff_label    # the `cause` label of pdserve_kv_handoff_failures, or ""
        return member


FAILURE_LABELS = tuple(dict.fromkeys(c.failure_label for c in Cause))
HANDOFF_LABELS = tuple(dict.fromkeys(c.handoff_label for c in Cause if c.handoff_label))


class ServeError(Exception):
    def __init__(self, cause: Cause, message: str):
        super().__init__(message)
        self.cause = cause
        self.message = message


def trailing_cause(cause: Cause) -> tuple[tuple[str, str], ...]:
    return ((CAUSE_KEY, cause.name),)


def cause_of(exc: grpc.aio.AioRpcError, default: Cause | None) -> Cause | None:
    """The cause a pdserve engine attached to a failed RPC; default when there is none
    (a transport failure, a peer that died, a deadline)."""
    for key, value in exc.trailing_metadata() or ():
        cause = cause_named(value, None) if key == CAUSE_KEY else None
        if cause is not None:
            return cause
    return default


def cause_named(name: str, default: Cause | None) -> Cause | None:
    """The Cause of a name an engine sent (a stream output's cause); default for one this
    front end does not know."""
    return Cause[name] if name in Cause.__members__ else default


def channel_closed_under_call() -> bool:
    """Inside `except asyncio.CancelledError` around an RPC: True when the call was cancelled
    because its channel was closed under it (another call found the peer gone and closed it),
    False when this task itself is being cancelled, which must go on up."""
    return not asyncio.current_task().cancelling()

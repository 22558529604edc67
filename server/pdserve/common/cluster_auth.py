"""The cluster secret: what lets engines and front ends of one cluster trust each other.

Every engine RPC carries the secret in the metadata key TOKEN_KEY, and engines refuse calls
without it (UNAUTHENTICATED); every engine record in etcd carries an HMAC-SHA256 of its fields
under the secret, and front ends ignore records whose signature does not verify. So a process
that can reach an engine port or write into etcd, but does not hold the secret, can neither
drive an engine (Generate, Prefill into a peer's memory, SetState) nor attract requests.

The secret comes from `--cluster-token-file` (the same file on every node); with the private
etcd and no file, pdserve makes a random one for the node, so the default is closed too.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets

import grpc

from pdserve.common.files import read_flag_file

TOKEN_KEY = "pdserve-cluster-token"


class ClusterAuthError(ValueError):
    pass


def read_token(path: str) -> str:
    token = read_flag_file(path, "cluster token file", ClusterAuthError).decode().strip()
    if len(token) < 16:
        raise ClusterAuthError(f"the cluster token in {path} has {len(token)} characters; use at least 16 "
                               "(e.g. `openssl rand -hex 32 > FILE`)")
    return token


def write_random_token(path: str) -> str:
    """A fresh secret in a file only this user can read; returns it."""
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def call_metadata(token: str) -> tuple[tuple[str, str], ...] | None:
    return ((TOKEN_KEY, token),) if token else None


def signature(fields: dict, token: str) -> str:
    """HMAC-SHA256 of a record's fields (all but `signature`), in a canonical JSON form."""
    body = json.dumps({k: v for k, v in fields.items() if k != "signature"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(token.encode(), body.encode(), hashlib.sha256).hexdigest()


def verify(fields: dict, token: str) -> bool:
    return hmac.compare_digest(str(fields.get("signature", "")), signature(fields, token))


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Engine side: every call must carry the cluster secret."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        sent = dict(details.invocation_metadata or ()).get(TOKEN_KEY, "")
        if hmac.compare_digest(sent, self.token):
            return await continuation(details)
        handler = await continuation(details)

        async def refuse(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "engine RPCs need this cluster's secret (pdserve --cluster-token-file)")

        if handler is not None and handler.response_streaming:
            async def refuse_stream(request, context):
                await refuse(request, context)
                yield  # never reached: makes this an async generator
            return grpc.unary_stream_rpc_method_handler(
                refuse_stream, request_deserializer=handler.request_deserializer)
        return grpc.unary_unary_rpc_method_handler(
            refuse, request_deserializer=handler.request_deserializer if handler else None)

"""A small asyncio etcd v3 client (over the generated stubs etcd-sdk-python ships); the private
etcd server process is common/etcd_server.py.

Only what membership needs: put/get/delete, leases with keepalive, and prefix watches from a
revision. Every call takes a deadline; endpoints are tried in order.

A shared etcd can be protected with its own TLS (`--etcd-cacert`, and `--etcd-cert`/`--etcd-key`
where etcd runs with `--client-cert-auth`) and its own users (`--etcd-user` with
`--etcd-password-file`): EtcdSecurity holds the file paths (engines get the same paths in their
spec, never the secrets), the client authenticates once and sends etcd's token with every call,
authenticating again when etcd says the token expired.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import AsyncIterator

import grpc
from pyetcd import etcdrpc

from pdserve.common.files import read_flag_file

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 3.0


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with prefix."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[:i + 1])
    return b"\0"


@dataclass
class WatchEvent:
    kind: str          # "put" or "delete"
    key: str
    value: bytes
    revision: int


class EtcdUnavailable(ConnectionError):
    # etcd closed the connection at once: an outage, or (when it persists) a plaintext client at
    # a TLS port; a front end's start-up check tells the two apart by retrying
    suspect_tls = False
    hint = ""            # the message with the flags to try, when suspect_tls


class EtcdRefused(EtcdUnavailable):
    """etcd answered but refused this client: TLS handshake, client certificate, user, password
    or permission. Retrying does not help; the message names the flags that fix it."""


class EtcdConfigError(ValueError):
    """The etcd security settings themselves are wrong (a file missing, a flag without its pair)."""


def _read(path: str, what: str) -> bytes:
    return read_flag_file(path, what, EtcdConfigError)


@dataclass(frozen=True)
class EtcdSecurity:
    """How to reach a protected etcd: file paths only, so they can travel in an engine's spec."""
    cacert: str = ""          # CA of etcd's server certificate (turns TLS on)
    cert: str = ""            # client certificate, for etcd's --client-cert-auth
    key: str = ""             # its private key
    user: str = ""            # etcd user (etcd's --auth: `etcdctl user add`, `auth enable`)
    password_file: str = ""   # that user's password, in a file
    tls: bool = False         # TLS without a CA file (system roots): an https:// endpoint

    @property
    def use_tls(self) -> bool:
        return self.tls or bool(self.cacert or self.cert)

    def check(self) -> None:
        """Reads every file once, so a wrong path fails at start with the flag's name."""
        if bool(self.cert) != bool(self.key):
            raise EtcdConfigError("--etcd-cert and --etcd-key go together (a client certificate and its key)")
        if bool(self.user) != bool(self.password_file):
            raise EtcdConfigError("--etcd-user and --etcd-password-file go together")
        self.credentials()
        self.password()

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.use_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.cacert, "--etcd-cacert") if self.cacert else None,
            private_key=_read(self.key, "--etcd-key") if self.key else None,
            certificate_chain=_read(self.cert, "--etcd-cert") if self.cert else None)

    def password(self) -> str:
        if not self.password_file:
            return ""
        password = _read(self.password_file, "--etcd-password-file").decode().rstrip("\r\n")
        if not password:
            raise EtcdConfigError(f"the etcd password file {self.password_file} is empty")
        return password

    def to_spec(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}

    @classmethod
    def from_spec(cls, spec: dict | None) -> "EtcdSecurity":
        return cls(**(spec or {}))


def parse_endpoints(text: str) -> tuple[list[str], bool]:
    """`host:port,...` (an http:// or https:// scheme is accepted; https means TLS): the
    endpoints without scheme, and whether any asked for TLS."""
    endpoints, tls = [], False
    for item in (e.strip() for e in text.split(",")):
        if not item:
            continue
        scheme, sep, rest = item.partition("://")
        if sep:
            if scheme not in ("http", "https"):
                raise EtcdConfigError(f"etcd endpoint {item}: use host:port, http://host:port or https://host:port")
            tls = tls or scheme == "https"
            item = rest.rstrip("/")
        endpoints.append(item)
    return endpoints, tls


# What etcd or gRPC say when this client's TLS or credentials do not fit the server: retrying
# cannot help, so a front end stops at start with the reason instead of waiting. A plaintext
# client at a TLS port only sees "Socket closed", as during an outage: that one is a suspicion.
_TLS_SIGNS = ("handshake", "ssl", "tsi_", "certificate")
_CLOSED = "socket closed"
_TOKEN_EXPIRED = ("invalid auth token", "auth token is expired")


def _is_refusal(exc: grpc.aio.AioRpcError) -> bool:
    code, details = exc.code(), (exc.details() or "").lower()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return True
    if code == grpc.StatusCode.INVALID_ARGUMENT and ("authentication failed" in details or "user name" in details):
        return True
    return code == grpc.StatusCode.UNAVAILABLE and any(sign in details for sign in _TLS_SIGNS)


def _refusal_hint(exc: grpc.aio.AioRpcError, security: EtcdSecurity) -> str:
    details = (exc.details() or "").lower()
    if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
        if not security.user:
            return ("etcd has authentication on: pass --etcd-user and --etcd-password-file (or a client certificate "
                    "whose common name is an etcd user) with read/write permission on the /pdserve/ keys")
        return f"etcd user '{security.user}' lacks read/write permission on the /pdserve/ keys"
    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
        return ("etcd requires a user: pass --etcd-user and --etcd-password-file" if not security.user
                else f"etcd refused user '{security.user}': check --etcd-user and --etcd-password-file")
    if not security.use_tls:
        return "etcd speaks TLS: pass --etcd-cacert (and --etcd-cert/--etcd-key if it requires client certificates)"
    if _CLOSED in details or "data_corrupted" in details or "bad_certificate" in details:
        return ("etcd closed the TLS connection: it probably requires a client certificate "
                "(--etcd-cert/--etcd-key, signed by the CA etcd trusts), or does not speak TLS")
    return "the TLS handshake with etcd failed: check --etcd-cacert (and the server certificate's names)"


class EtcdClient:
    def __init__(self, endpoints: list[str], security: EtcdSecurity | None = None):
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        self.endpoints = endpoints
        self.security = security or EtcdSecurity()
        self._credentials = self.security.credentials()
        self._password = self.security.password()
        self._token = ""            # etcd's auth token for the current endpoint
        self._index = 0
        self._open(endpoints[0])

    def _open(self, endpoint: str) -> None:
        if self._credentials is None:
            self.channel = grpc.aio.insecure_channel(endpoint)
        else:
            self.channel = grpc.aio.secure_channel(endpoint, self._credentials)
        self._token = ""
        self.kv = etcdrpc.KVStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.watcher = etcdrpc.WatchStub(self.channel)
        self.auth = etcdrpc.AuthStub(self.channel)

    async def _rotate(self) -> None:
        if len(self.endpoints) > 1:
            await self.channel.close()
            self._index = (self._index + 1) % len(self.endpoints)
            self._open(self.endpoints[self._index])

    async def _failed(self, exc: grpc.aio.AioRpcError, what: str) -> EtcdUnavailable:
        """The exception for a failed call: EtcdRefused when retrying cannot help, else
        EtcdUnavailable (after moving on to the next endpoint)."""
        endpoint = self.endpoints[self._index]
        message = f"etcd {endpoint} {what}: {exc.code().name} {exc.details()}"
        await self._rotate()
        if _is_refusal(exc):
            return EtcdRefused(f"{message} ({_refusal_hint(exc, self.security)})")
        if exc.code() == grpc.StatusCode.UNAVAILABLE and _CLOSED in (exc.details() or "").lower():
            error = EtcdUnavailable(message)
            error.suspect_tls = True
            error.hint = f"{message} ({_refusal_hint(exc, self.security)})"
            return error
        return EtcdUnavailable(message)

    async def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        """etcd's auth token for this client's user (authenticating when there is none yet)."""
        if not self.security.user:
            return None
        if not self._token:
            try:
                response = await self.auth.Authenticate(
                    etcdrpc.AuthenticateRequest(name=self.security.user, password=self._password),
                    timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                raise await self._failed(exc, "authenticate") from exc
            self._token = response.token
        return (("token", self._token),)

    def _token_expired(self, exc: grpc.aio.AioRpcError) -> bool:
        if self.security.user and any(s in (exc.details() or "").lower() for s in _TOKEN_EXPIRED):
            self._token = ""
            return True
        return False

    async def _call(self, fn, request):
        what = getattr(fn, "_method", b"call").decode().rsplit("/", 1)[-1]
        for attempt in range(2):
            try:
                return await fn(request, timeout=CALL_TIMEOUT_S, metadata=await self._metadata())
            except grpc.aio.AioRpcError as exc:
                if attempt == 0 and self._token_expired(exc):
                    continue    # authenticate again, once
                raise await self._failed(exc, what) from exc

    async def check(self, prefix: str) -> None:
        """One read under prefix: raises EtcdRefused when etcd refuses this client (TLS, user,
        permission), EtcdUnavailable when it cannot be reached."""
        key = prefix.encode()
        await self._call(self.kv.Range, etcdrpc.RangeRequest(key=key, range_end=prefix_end(key), limit=1,
                                                             keys_only=True))

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        response = await self._call(self.kv.Put, etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease))
        return response.header.revision

    async def get_prefix(self, prefix: str) -> tuple[int, list[tuple[str, bytes, int]]]:
        """Returns the store's revision and every (key, value, lease id) under prefix."""
        key = prefix.encode()
        response = await self._call(self.kv.Range, etcdrpc.RangeRequest(key=key, range_end=prefix_end(key)))
        return response.header.revision, [(kv.key.decode(), kv.value, kv.lease) for kv in response.kvs]

    async def delete(self, key: str) -> None:
        await self._call(self.kv.DeleteRange, etcdrpc.DeleteRangeRequest(key=key.encode()))

    async def grant(self, ttl: int) -> int:
        response = await self._call(self.lease.LeaseGrant, etcdrpc.LeaseGrantRequest(TTL=ttl))
        return response.ID

    async def revoke(self, lease_id: int) -> None:
        await self._call(self.lease.LeaseRevoke, etcdrpc.LeaseRevokeRequest(ID=lease_id))

    async def keepalive(self, lease_id: int) -> int:
        """Refreshes a lease once; returns its TTL, 0 when the lease no longer exists."""
        call = self.lease.LeaseKeepAlive(timeout=CALL_TIMEOUT_S, metadata=await self._metadata())
        try:
            await call.write(etcdrpc.LeaseKeepAliveRequest(ID=lease_id))
            response = await call.read()
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            self._token_expired(exc)   # the next call authenticates again
            raise await self._failed(exc, "keepalive") from exc
        finally:
            call.cancel()
        return response.TTL if response is not grpc.aio.EOF else 0

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Yields every change under prefix from start_revision on; raises EtcdUnavailable when cut."""
        key = prefix.encode()
        call = self.watcher.Watch(metadata=await self._metadata())
        try:
            await call.write(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=key, range_end=prefix_end(key), start_revision=start_revision)))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF or response.canceled:
                    raise EtcdUnavailable(f"etcd watch ended: {getattr(response, 'cancel_reason', 'EOF')}")
                for ev in response.events:
                    kind = "delete" if ev.type == ev.DELETE else "put"
                    yield WatchEvent(kind, ev.kv.key.decode(), ev.kv.value, ev.kv.mod_revision)
        except grpc.aio.AioRpcError as exc:
            self._token_expired(exc)
            raise await self._failed(exc, "watch") from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()

"""Who may call the client ports: TLS (optionally mutual) and Triton's restricted protocols.

gRPC flags and behaviour follow Triton's: `--grpc-use-ssl`, `--grpc-use-ssl-mutual`,
`--grpc-server-cert`, `--grpc-server-key`, `--grpc-root-cert`, and
`--grpc-restricted-protocol=<protocol>[,<protocol>...]:<key>=<value>`: a call to a method of a
restricted protocol without the header `triton-grpc-protocol-<key>: <value>` is refused with
UNAVAILABLE "This protocol is restricted, expecting header 'triton-grpc-protocol-<key>'".

Triton's HTTP server has no TLS flags (it expects a TLS-terminating proxy), nor has its OpenAI
frontend; pdserve's two HTTP doors take the same five flags as the gRPC port, named after their
door: `--http-use-ssl`, `--http-use-ssl-mutual`, `--http-server-cert`, `--http-server-key`,
`--http-root-cert`, and `--openai-...` alike (vLLM's `--ssl-certfile`, `--ssl-keyfile`,
`--ssl-ca-certs`, `--ssl-cert-reqs 2` are `--openai-server-cert`, `--openai-server-key`,
`--openai-root-cert`, `--openai-use-ssl-mutual`; docs/security.md).
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc

from pdserve.common.files import read_flag_file

HEADER_PREFIX = "triton-grpc-protocol-"

# Triton's protocol groups and the GRPCInferenceService methods in each.
PROTOCOLS = {
    "health": ("ServerLive", "ServerReady", "ModelReady"),
    "metadata": ("ServerMetadata", "ModelMetadata"),
    "inference": ("ModelInfer", "ModelStreamInfer"),
    "shared-memory": ("SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
                      "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"),
    "model-config": ("ModelConfig",),
    "model-repository": ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
    "statistics": ("ModelStatistics",),
    "trace": ("TraceSetting",),
    "logging": ("LogSettings",),
}
STREAMING_METHODS = ("ModelStreamInfer",)


class SecurityConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Restriction:
    protocols: tuple[str, ...]
    header: str     # the full header name, lower case
    value: str


def parse_restriction(text: str) -> Restriction:
    """`<protocols>:<key>=<value>`, protocols separated by commas."""
    protocols, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not key or not protocols:
        raise SecurityConfigError(f"--grpc-restricted-protocol '{text}' is not <protocols>:<key>=<value>, "
                                  "e.g. model-repository,statistics:admin-key=secret")
    names = tuple(p.strip() for p in protocols.split(","))
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown:
        raise SecurityConfigError(f"--grpc-restricted-protocol names unknown protocol(s) {unknown}; "
                                  f"known: {', '.join(PROTOCOLS)}")
    return Restriction(names, f"{HEADER_PREFIX}{key.strip().lower()}", value)


def restrictions_by_method(restrictions: list[Restriction]) -> dict[str, Restriction]:
    out: dict[str, Restriction] = {}
    for restriction in restrictions:
        for protocol in restriction.protocols:
            for method in PROTOCOLS[protocol]:
                if method in out:
                    raise SecurityConfigError(f"protocol '{protocol}' is restricted twice")
                out[method] = restriction
    return out


class RestrictedProtocolInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, restrictions: list[Restriction]):
        self.by_method = restrictions_by_method(restrictions)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method.rsplit("/", 1)[-1]
        restriction = self.by_method.get(method)
        if restriction is None:
            return await continuation(details)
        headers = dict(details.invocation_metadata or ())
        if headers.get(restriction.header) == restriction.value:
            return await continuation(details)
        message = f"This protocol is restricted, expecting header '{restriction.header}'"

        async def refuse(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)

        if method in STREAMING_METHODS:
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


def _read(path: str, flag: str) -> bytes:
    return read_flag_file(path, flag, SecurityConfigError)


def _check_tls_flags(door: str, use_ssl: bool, mutual: bool, cert: str, key: str, root: str) -> bool:
    """Whether the door serves TLS; raises on a flag without what it needs."""
    if not use_ssl and not mutual:
        return False
    if not cert or not key:
        raise SecurityConfigError(f"--{door}-use-ssl needs --{door}-server-cert and --{door}-server-key (PEM files)")
    if mutual and not root:
        raise SecurityConfigError(f"--{door}-use-ssl-mutual needs --{door}-root-cert: the CA that signs client "
                                  "certificates")
    return True


def server_credentials(use_ssl: bool, mutual: bool, cert: str, key: str, root: str) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (None: plaintext), read from PEM files."""
    if not _check_tls_flags("grpc", use_ssl, mutual, cert, key, root):
        return None
    pair = [(_read(key, "--grpc-server-key"), _read(cert, "--grpc-server-cert"))]
    root_pem = _read(root, "--grpc-root-cert") if root else None
    return grpc.ssl_server_credentials(pair, root_certificates=root_pem, require_client_auth=mutual)


def server_ssl_context(door: str, use_ssl: bool, mutual: bool, cert: str, key: str, root: str) -> ssl.SSLContext | None:
    """The TLS context of an HTTP door (door "http" or "openai", for the flags' names in
    errors); None: plaintext. A certificate given without --<door>-use-ssl is refused rather
    than silently served in clear text."""
    if not _check_tls_flags(door, use_ssl, mutual, cert, key, root):
        if cert or key or root:
            raise SecurityConfigError(f"--{door}-server-cert/--{door}-server-key/--{door}-root-cert are given but "
                                      f"TLS is off: add --{door}-use-ssl (or --{door}-use-ssl-mutual)")
        return None
    for path, flag in ((cert, "server-cert"), (key, "server-key"), (root, "root-cert")):
        if path:
            _read(path, f"--{door}-{flag}")      # a missing file names its flag
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if root:
            context.load_verify_locations(cafile=root)
    except ssl.SSLError as exc:
        raise SecurityConfigError(f"--{door}-server-cert/--{door}-server-key/--{door}-root-cert: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED if mutual else ssl.CERT_NONE
    return context

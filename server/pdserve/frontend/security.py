"""Who may call the KServe gRPC port: TLS (optionally mutual) and Triton's restricted protocols.

Flags and behaviour follow Triton's: `--grpc-use-ssl`, `--grpc-use-ssl-mutual`,
`--grpc-server-cert`, `--grpc-server-key`, `--grpc-root-cert`, and
`--grpc-restricted-protocol=<protocol>[,<protocol>...]:<key>=<value>`: a call to a method of a
restricted protocol without the header `triton-grpc-protocol-<key>: <value>` is refused with
UNAVAILABLE "This protocol is restricted, expecting header 'triton-grpc-protocol-<key>'".
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

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


def server_credentials(use_ssl: bool, mutual: bool, cert: str, key: str, root: str) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (None: plaintext), read from PEM files."""
    if not use_ssl and not mutual:
        return None
    if not cert or not key:
        raise SecurityConfigError("--grpc-use-ssl needs --grpc-server-cert and --grpc-server-key (PEM files)")
    if mutual and not root:
        raise SecurityConfigError("--grpc-use-ssl-mutual needs --grpc-root-cert: the CA that signs client certificates")

    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise SecurityConfigError(f"cannot read the {what} {path}: {exc}") from exc

    pair = [(read(key, "--grpc-server-key"), read(cert, "--grpc-server-cert"))]
    root_pem = read(root, "--grpc-root-cert") if root else None
    return grpc.ssl_server_credentials(pair, root_certificates=root_pem, require_client_auth=mutual)

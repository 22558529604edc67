"""The `pdserve` command: one node's front end and the engines of its models."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve._proto import grpc_service_pb2, grpc_service_pb2_grpc
from pdserve.common.cluster_auth import ClusterAuthError, read_token, write_random_token
from pdserve.common.constants import GRPC_MESSAGE_OPTIONS
from pdserve.common import cpu_priority
from pdserve.common.cpu_priority import DEFAULT_PRIORITY, PRIORITIES, lower_front_end
from pdserve.common.records import engines_prefix
from pdserve.common.etcd import (EtcdClient, EtcdConfigError, EtcdRefused, EtcdSecurity, EtcdUnavailable,
                                 parse_endpoints)
from pdserve.common.etcd_server import EtcdProcess
from pdserve.common.mooncake_master import KVStoreMasters
from pdserve.cluster.model_files import ModelFiles
from pdserve.cluster.publisher import ModelPublisher
from pdserve.cluster.registry import RegistryView
from pdserve.cluster.load import LoadPlane
from pdserve.frontend.core import InferenceCore
from pdserve.frontend.health import Health
from pdserve.frontend.http_server import KServeHttp
from pdserve.frontend.openai_server import OpenAIServer
from pdserve.frontend.security import (RestrictedProtocolInterceptor, SecurityConfigError, parse_restriction,
                                       server_credentials, server_ssl_context)
from pdserve.frontend.service import InferenceService
from pdserve.frontend.metrics import Metrics
from pdserve.frontend.settings import Settings
from pdserve.repository.manager import ModelRepositoryManager
from pdserve.cluster.router import DEFAULT_POLICY, POLICIES, Router
from pdserve.repository.supervisor import ClusterSettings, Supervisor

log = logging.getLogger("pdserve")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve", description="Serve a model repository over KServe v2 (gRPC and "
                                 "HTTP/REST) and an OpenAI-compatible API.")
    ap.add_argument("--model-repository", required=True, help="the folder of model folders")
    ap.add_argument("--model-control-mode", choices=["none", "poll", "explicit"], default="poll")
    ap.add_argument("--repository-poll-secs", type=float, default=15.0,
                    help="poll mode: full rescan period in seconds (file events act sooner)")
    ap.add_argument("--load-model", action="append", default=[], metavar="NAME",
                    help="explicit mode: a model to load at start (repeatable)")
    ap.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC (with grpc.health.v1)")
    ap.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP/REST; 0 turns it off")
    ap.add_argument("--openai-port", type=int, default=9000, help="OpenAI-compatible API (/v1/...); 0 turns it off")
    ap.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics; 0 turns it off")
    ap.add_argument("--host", default="0.0.0.0", help="address the gRPC, HTTP, OpenAI and metrics servers bind")
    ap.add_argument("--advertise-host", default="127.0.0.1", help="address engines bind and announce")
    ap.add_argument("--etcd-endpoints", default="",
                    help="host:port,... of the cluster's etcd (https://host:port: over TLS); omitted: a private "
                         "local etcd (single node)")
    ap.add_argument("--kv-store-endpoint", default="", metavar="HOST:PORT",
                    help="the Mooncake master of the cluster's KV store (models with kv_store: mooncake); "
                         "omitted: the one published in etcd, else a private one this node starts and publishes")
    ap.add_argument("--cluster", default="default", help="the cluster's name: the etcd key prefix /pdserve/NAME/")
    ap.add_argument("--node-name", default="", help="this node in the registry (default: hostname:grpc-port)")
    ap.add_argument("--lease-ttl", type=int, default=10, help="seconds an engine's record outlives its last keepalive")
    ap.add_argument("--routing-policy", choices=sorted(POLICIES), default=DEFAULT_POLICY,
                    help="kv_aware (default): the engine holding the longest cached prefix of the prompt, weighed "
                         "against its load; least_load; round_robin")
    ap.add_argument("--frontend-cpu-priority", choices=PRIORITIES, default=DEFAULT_PRIORITY,
                    help="batch: the front end's threads never preempt a running engine thread (Linux "
                         "SCHED_BATCH) yet keep their fair share; idle: they take a core only when no engine "
                         "wants it (SCHED_IDLE: fastest beside one engine computing on every core, but engines "
                         "pinned one per core starve it); auto (default): idle if the node runs exactly one "
                         "engine, on device cpu, once the startup models are loaded, else batch; normal. Engines "
                         "and the private etcd run at normal priority either way (docs/architecture.md)")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--cluster-token-file", default="", metavar="FILE",
                    help="the cluster secret (at least 16 characters, the same file on every node): engine RPCs "
                         "and etcd records without it are refused; default with the private etcd: a random one")
    tls = ap.add_argument_group("gRPC security (Triton's flags)")
    tls.add_argument("--grpc-use-ssl", type=flag, nargs="?", const=True, default=False,
                     help="serve the gRPC port over TLS (needs --grpc-server-cert and --grpc-server-key)")
    tls.add_argument("--grpc-use-ssl-mutual", type=flag, nargs="?", const=True, default=False,
                     help="TLS that also requires client certificates signed by --grpc-root-cert")
    tls.add_argument("--grpc-server-cert", default="", metavar="PEM", help="the server's certificate chain")
    tls.add_argument("--grpc-server-key", default="", metavar="PEM", help="the server's private key")
    tls.add_argument("--grpc-root-cert", default="", metavar="PEM", help="the CA of client certificates (mutual TLS)")
    tls.add_argument("--grpc-restricted-protocol", action="append", default=[], type=restriction,
                     metavar="<protocols>:<key>=<value>",
                     help="calls of these protocols (health, metadata, inference, model-config, model-repository, "
                          "statistics, shared-memory, trace, logging; comma-separated) need the header "
                          "triton-grpc-protocol-<key>: <value> (repeatable)")
    for door, what in (("http", "KServe v2 HTTP/REST"), ("openai", "OpenAI-compatible")):
        group = ap.add_argument_group(f"{what} port security (the gRPC port's flags, named --{door}-...)")
        group.add_argument(f"--{door}-use-ssl", type=flag, nargs="?", const=True, default=False,
                           help=f"serve the {what} port over TLS (https; needs --{door}-server-cert and "
                                f"--{door}-server-key)")
        group.add_argument(f"--{door}-use-ssl-mutual", type=flag, nargs="?", const=True, default=False,
                           help=f"TLS that also requires client certificates signed by --{door}-root-cert")
        group.add_argument(f"--{door}-server-cert", default="", metavar="PEM", help="the server's certificate chain")
        group.add_argument(f"--{door}-server-key", default="", metavar="PEM", help="the server's private key")
        group.add_argument(f"--{door}-root-cert", default="", metavar="PEM",
                           help="the CA of client certificates (mutual TLS)")
    etcd = ap.add_argument_group("etcd security (a shared etcd with TLS and users; paths, never secrets)")
    etcd.add_argument("--etcd-cacert", default="", metavar="PEM", help="speak TLS to etcd, trusting this CA")
    etcd.add_argument("--etcd-cert", default="", metavar="PEM",
                      help="client certificate, for an etcd with --client-cert-auth (implies TLS)")
    etcd.add_argument("--etcd-key", default="", metavar="PEM", help="the client certificate's private key")
    etcd.add_argument("--etcd-user", default="", metavar="NAME", help="etcd user (an etcd with auth enabled)")
    etcd.add_argument("--etcd-password-file", default="", metavar="FILE", help="that user's password, in a file")
    return ap


def restriction(text: str):
    try:
        return parse_restriction(text)
    except (SecurityConfigError, ClusterAuthError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def flag(text: str) -> bool:
    """Triton's boolean flag values: --grpc-use-ssl, --grpc-use-ssl=true, --grpc-use-ssl=0."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not a boolean (true or false)")


def cluster_token_file(given: str, run_dir: str, private: bool) -> str:
    """The cluster secret's file: the one given, or with the private etcd a fresh random one;
    "" (no secret) only for a shared etcd without --cluster-token-file."""
    if given:
        read_token(given)   # fail now, with the reason, rather than in every engine
        return given
    if private:
        path = os.path.join(run_dir, "cluster.token")
        write_random_token(path)
        return path
    log.warning("no --cluster-token-file: engine RPCs and etcd records of this cluster are not authenticated; "
                "anyone who reaches an engine port or etcd can use them (docs/security.md)")
    return ""


def etcd_security(args, endpoints: list[str], tls: bool) -> EtcdSecurity:
    """The etcd flags, checked (every file read once) and made absolute for the engines."""
    def path(p: str) -> str:
        return os.path.abspath(p) if p else ""
    security = EtcdSecurity(cacert=path(args.etcd_cacert), cert=path(args.etcd_cert), key=path(args.etcd_key),
                            user=args.etcd_user, password_file=path(args.etcd_password_file), tls=tls)
    if not endpoints and security != EtcdSecurity():
        raise EtcdConfigError("--etcd-cacert/--etcd-cert/--etcd-key/--etcd-user are for a shared etcd: "
                              "pass --etcd-endpoints too (the private etcd listens on loopback only)")
    security.check()
    return security


async def preflight_etcd(etcd: EtcdClient, prefix: str, attempts: int = 3) -> bool:
    """Reads from etcd before anything starts: True when it answered, False when it is not
    reachable (yet: engines register when it comes); raises EtcdRefused when etcd refuses this
    client again and again (TLS, user or permission), which no waiting mends."""
    for attempt in range(attempts):
        try:
            await etcd.check(prefix)
            return True
        except EtcdRefused:
            if attempt == attempts - 1:
                raise
        except EtcdUnavailable as exc:
            if not exc.suspect_tls:
                return False
            if attempt == attempts - 1:     # closed at once, every time: a TLS port
                raise EtcdRefused(exc.hint) from exc
        await asyncio.sleep(0.5)
    return False


async def run(args) -> None:
    credentials = server_credentials(args.grpc_use_ssl, args.grpc_use_ssl_mutual, args.grpc_server_cert,
                                     args.grpc_server_key, args.grpc_root_cert)   # bad files fail before any work
    door_tls = {door: server_ssl_context(door, getattr(args, f"{door}_use_ssl"), getattr(args, f"{door}_use_ssl_mutual"),
                                         getattr(args, f"{door}_server_cert"), getattr(args, f"{door}_server_key"),
                                         getattr(args, f"{door}_root_cert"))
                for door in ("http", "openai")}
    endpoints, etcd_tls = parse_endpoints(args.etcd_endpoints)
    security = etcd_security(args, endpoints, etcd_tls)
    run_dir = tempfile.mkdtemp(prefix="pdserve-")
    embedded_etcd = None
    if not endpoints:
        embedded_etcd = EtcdProcess(data_dir=os.path.join(run_dir, "etcd"))
        embedded_etcd.start()
        endpoints = [embedded_etcd.endpoint]
        log.info("private etcd on %s (pass --etcd-endpoints to join a cluster)", embedded_etcd.endpoint)
    log.info("front end CPU priority: %s", lower_front_end(args.frontend_cpu_priority))
    if args.frontend_cpu_priority in ("idle", "auto") and os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE":
        log.warning("OMP_WAIT_POLICY=ACTIVE: CPU engines spin on idle cores, which leaves an idle-priority front "
                    "end little CPU; consider --frontend-cpu-priority batch")
    token_file = cluster_token_file(args.cluster_token_file, run_dir, private=embedded_etcd is not None)
    token = read_token(token_file) if token_file else ""
    etcd = EtcdClient(endpoints, security)
    if not await preflight_etcd(etcd, engines_prefix(args.cluster)):
        log.warning("etcd at %s does not answer yet; serving on and registering engines when it does",
                    ",".join(endpoints))
    registry = RegistryView(etcd, args.cluster, token)
    registry.start()
    plane = LoadPlane(token)   # the engine clients, and their load as the router, metrics and watchdog read it
    node = args.node_name or f"{socket.gethostname()}:{args.grpc_port}"
    publisher = ModelPublisher(etcd, args.cluster, node, args.lease_ttl, token)   # the configs this node serves
    publisher.start()
    kv_store = KVStoreMasters(etcd, args.cluster, node, args.advertise_host, run_dir, args.kv_store_endpoint, token,
                              args.lease_ttl)
    supervisor = Supervisor(args.advertise_host, run_dir,
                            ClusterSettings(endpoints, args.cluster, node, args.lease_ttl, token_file,
                                            security.to_spec(), kv_store.endpoint), plane, registry)
    manager = ModelRepositoryManager(args.model_repository, supervisor, args.model_control_mode,
                                     args.repository_poll_secs, args.load_model, publisher)
    metrics = Metrics(manager, registry, plane)
    core = InferenceCore(manager, Router(registry, plane, args.routing_policy), metrics,  # one path for every door
                         model_files=ModelFiles(etcd, args.cluster, os.path.join(run_dir, "model-files")))
    settings = Settings(manager)   # trace and log settings, one for the gRPC and HTTP doors
    service = InferenceService(manager, core.router, metrics, core, settings)
    health = Health(service)
    interceptors = [RestrictedProtocolInterceptor(args.grpc_restricted_protocol)] if args.grpc_restricted_protocol else []
    server = grpc.aio.server(options=GRPC_MESSAGE_OPTIONS, interceptors=interceptors)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        from grpc_reflection.v1alpha import reflection
        reflection.enable_server_reflection(
            [grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    except ImportError:
        pass
    if credentials is None:
        server.add_insecure_port(f"{args.host}:{args.grpc_port}")
    else:
        server.add_secure_port(f"{args.host}:{args.grpc_port}", credentials)
    await server.start()
    doors = []
    if args.http_port:
        doors.append((KServeHttp(service, settings).door, args.http_port, door_tls["http"]))
    if args.openai_port:
        doors.append((OpenAIServer(core, manager).door, args.openai_port, door_tls["openai"]))
    for door, port, tls in doors:
        await door.start(args.host, port, tls)
    if args.metrics_port:
        metrics.serve(args.host, args.metrics_port)
    log.info("KServe v2 gRPC on %s:%d, HTTP on :%d, OpenAI on :%d, metrics on :%d, repository %s (%s mode)",
             args.host, args.grpc_port, args.http_port, args.openai_port, args.metrics_port,
             args.model_repository, args.model_control_mode)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(registry.connected.wait(), timeout=30)
    except asyncio.TimeoutError:
        log.error("etcd at %s is not reachable; engines will register when it is", ",".join(endpoints))
    # every engine of the cluster (the router's loads) and this node's own (its watchdog, its metrics)
    plane.start(lambda: {r.address for r in registry.records.values()}
                | {e.address for d in manager.all_deployments() for e in d.live_engines()})
    health.start()
    await manager.start()
    settled = cpu_priority.settle()
    if settled:
        log.info("front end CPU priority: %s", settled)
    service.started = True
    log.info("pdserve ready (node %s, cluster %s)", node, args.cluster)
    await stop.wait()
    log.info("shutting down")
    await health.close()
    for door, _, _ in doors:
        await door.stop()
    await server.stop(grace=3)
    plane.stop()
    await publisher.close()
    await manager.close()
    await kv_store.close()
    await registry.close()
    await plane.close()
    await etcd.close()
    if embedded_etcd is not None:
        embedded_etcd.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s pdserve %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(args))
    except (SecurityConfigError, ClusterAuthError, EtcdConfigError, EtcdRefused) as exc:
        raise SystemExit(f"pdserve: {exc}") from None


if __name__ == "__main__":
    main()

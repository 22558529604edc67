"""The private etcd server process (EtcdProcess)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from pdserve.common import process


class _PortTaken(Exception):
    """etcd exited because one of its ports was bound by someone else meanwhile."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdProcess:
    """A private single-member etcd on loopback: pdserve's default without --etcd-endpoints,
    and the tests' real etcd. Its data folder outlives stop(), so a start() after it keeps
    the leases and records (the tests' etcd-restart case)."""

    def __init__(self, data_dir: str | None = None, client_port: int | None = None, cert_file: str = "",
                 key_file: str = "", client_ca_file: str = "", extra_args: tuple[str, ...] = ()):
        self.binary = shutil.which("etcd") or "/usr/bin/etcd"
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="pdserve-etcd-")
        os.makedirs(self.data_dir, exist_ok=True)
        self.client_port = client_port or _free_port()
        self.peer_port = _free_port()
        self._client_port_chosen = client_port is None
        self.proc: subprocess.Popen | None = None
        # TLS on the client URL (the tests' protected etcd): a server certificate, and with
        # client_ca_file etcd's --client-cert-auth (clients need a certificate of that CA)
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self.extra_args = tuple(extra_args)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> "EtcdProcess":
        """Start etcd and wait until it accepts connections. A port chosen here was free when
        chosen but released before etcd binds it; if something took it in that gap, choose
        again (a port the caller named is kept: that is the caller's to pick)."""
        if not os.path.exists(self.binary):
            raise FileNotFoundError("etcd is not installed: `make setup` installs Debian's etcd-server")
        for _ in range(attempts):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                self.peer_port = _free_port()
                if self._client_port_chosen:
                    self.client_port = _free_port()
        raise RuntimeError(f"etcd could not bind its ports {attempts} times; see {self.log.name}")

    def _start_once(self, timeout: float) -> "EtcdProcess":
        scheme = "https" if self.cert_file else "http"
        url, peer = f"{scheme}://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        tls = ["--cert-file", self.cert_file, "--key-file", self.key_file] if self.cert_file else []
        if self.client_ca_file:
            tls += ["--trusted-ca-file", self.client_ca_file, "--client-cert-auth"]
        self.log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        self.proc = process.spawn(
            [self.binary, "--name", "pdserve", "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"pdserve={peer}", *tls, *self.extra_args], self.log)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.log.close()
                with open(self.log.name, "rb") as f:
                    if b"address already in use" in f.read()[-4096:]:
                        raise _PortTaken()
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"etcd did not start on {self.endpoint}")

    def stop(self) -> None:
        process.stop(self.proc)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

"""Keeps every listener of an engine process on its advertise host.

Mooncake's transfer engine (0.3.13) binds its handshake port to 0.0.0.0 and its TCP data port
to [::] whatever host it is given, and has no setting for it. So engines start with a small
preloaded library (bind_host.c) that turns a wildcard bind() into a bind to the advertise host.
It is compiled once per source and machine type into pdserve's cache (the C compiler the CPU
attention kernel needs already); without a compiler the engine still runs, listening as
Mooncake chooses, and the front end logs a warning (docs/security.md has the firewall rule).
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import threading

log = logging.getLogger("pdserve.engine")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bind_host.c")
WILDCARDS = ("", "0.0.0.0", "::")
_build_lock = threading.Lock()   # engines start from executor threads: one build, not one each


def cache_dir() -> str:
    return os.environ.get("PDSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pdserve")


def library() -> str | None:
    """The compiled library's path, or None when it cannot be built here (the reason is logged)."""
    with _build_lock:
        return _build()


@functools.cache
def _build() -> str | None:
    with open(SOURCE, "rb") as f:
        key = hashlib.sha1(f.read() + platform.machine().encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"bind_host-{key}.so")
    if os.path.exists(path):
        return path
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: Mooncake's KV transfer ports will listen on every interface")
        return None
    tmp = ""
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".so")
        os.close(fd)
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", tmp, SOURCE, "-ldl"],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp, path)  # atomic: engines started at once never load half a file
        return path
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("could not build %s (%s %s): Mooncake's KV transfer ports will listen on every interface",
                    SOURCE, exc, detail.decode(errors="replace")[-300:])
        return None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def host_address(host: str) -> str | None:
    """host as an IP literal (names resolved), or None for a wildcard host (nothing to confine)."""
    if host in WILDCARDS:
        return None
    try:
        address = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        try:
            address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
        except OSError as exc:   # the engine's own bind will fail and say so; nothing to confine here
            log.warning("advertise host %s does not resolve (%s)", host, exc)
            return None
    return None if address in WILDCARDS else address


def environment(host: str, base: dict[str, str]) -> dict[str, str]:
    """What to add to an engine's environment so its wildcard binds land on host."""
    address = host_address(host)
    path = library() if address else None
    if path is None:
        return {}
    preload = " ".join(p for p in (path, base.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload, "PDSERVE_BIND_HOST": address}

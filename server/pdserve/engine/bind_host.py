"""Keeps every listener of an engine process on its advertise host.

Mooncake's transfer engine (0.3.13) binds its handshake port to 0.0.0.0 and its TCP data port
to [::] whatever host it is given, and has no setting for it. So engines start with a small
preloaded library (bind_host.c) that turns a wildcard bind() into a bind to the advertise host.
It is compiled at install (setup.py, as the module pdserve.engine._bind_host), never at an
engine's start; where it was not built the engine still runs, listening as Mooncake chooses,
and the front end logs a warning (docs/security.md has the firewall rule).
"""
from __future__ import annotations

import functools
import importlib.util
import ipaddress
import logging
import socket

log = logging.getLogger("pdserve.engine")

MODULE = "pdserve.engine._bind_host"   # a plain C library, named and installed like an extension
WILDCARDS = ("", "0.0.0.0", "::")


@functools.cache
def library() -> str | None:
    """The built library's path, or None where it was not built (logged once)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.origin:
        log.warning("%s is not built (run `make setup`): Mooncake's KV transfer ports will listen on every "
                    "interface", MODULE)
        return None
    return spec.origin


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

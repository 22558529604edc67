"""Reading the files that flags name (certificates, keys, passwords, the cluster token)."""
from __future__ import annotations


def read_flag_file(path: str, what: str, error: type[Exception]) -> bytes:
    """The file's bytes; an unreadable file raises `error` naming `what` (the flag) and the path."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc}") from exc

"""A model version's tokenizer files, shared through etcd with nodes that do not hold the model.

Front ends tokenize prompts and render chat templates; a router-only node has no repository
folder to read them from. The node that serves a model publishes the files as content-addressed
blobs, and its model record (common/records.py) names each file by its SHA-256 digest, so the
record's signature covers the files. Blobs live outside the cluster prefix that every registry
view watches (a tokenizer.json is megabytes) and are split into chunks below etcd's request
limit:

    /pdserve-files/<cluster>/<sha256>/<chunk index, 4 digits>  ->  bytes

A reader joins the chunks, checks the digest and keeps the files in a local folder, one per set
of digests, which the tokenizer and chat-template code read like a version folder.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile

from pdserve.common.errors import Cause, ServeError
from pdserve.common.etcd import EtcdClient, EtcdUnavailable
from pdserve.common.records import ModelRecord

log = logging.getLogger(__name__)

# What a front end reads of a version folder: the tokenizer and the chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CHUNK_BYTES = 1 << 20   # etcd refuses requests over 1.5 MiB by default


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_prefix(cluster: str, digest: str = "") -> str:
    return f"/pdserve-files/{cluster}/{digest}/" if digest else f"/pdserve-files/{cluster}/"


def read_tokenizer_files(folder: str) -> dict[str, bytes]:
    """The tokenizer files a version folder has (name -> contents)."""
    out = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def blob_entries(cluster: str, digest: str, data: bytes) -> dict[str, bytes]:
    """The etcd keys and values that hold data, whose digest_of is digest."""
    prefix = files_prefix(cluster, digest)
    return {f"{prefix}{i // CHUNK_BYTES:04d}": data[i:i + CHUNK_BYTES]
            for i in range(0, max(len(data), 1), CHUNK_BYTES)}


def join_chunks(digest: str, kvs: list[tuple[str, bytes, int]]) -> bytes | None:
    """A blob from its chunks as etcd returned them; None when it is incomplete or corrupt."""
    data = b"".join(value for _, value, _ in sorted(kvs, key=lambda kv: kv[0]))
    return data if digest_of(data) == digest else None


class ModelFiles:
    """Fetches published tokenizer files once per set of digests, into folders under `root`."""

    def __init__(self, client: EtcdClient, cluster: str, root: str | None = None):
        self.client = client
        self.cluster = cluster
        self.root = root or tempfile.mkdtemp(prefix="pdserve-model-files-")
        self._folders: dict[str, asyncio.Future] = {}

    async def folder(self, record: ModelRecord) -> str:
        """A local folder with the record's files; ServeError (not ready) when they cannot be read."""
        files = dict(sorted(record.files.items()))
        key = digest_of(repr(files).encode())
        future = self._folders.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._folders[key] = asyncio.ensure_future(self._fetch(files, os.path.join(self.root, key)))
        return await asyncio.shield(future)

    async def _fetch(self, files: dict[str, str], folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        for name, digest in files.items():
            if name not in TOKENIZER_FILES:   # a name from etcd never becomes a path elsewhere
                continue
            try:
                _, kvs = await self.client.get_prefix(files_prefix(self.cluster, digest))
            except EtcdUnavailable as exc:
                raise ServeError(Cause.MODEL_NOT_READY, f"cannot read the model's {name} from etcd ({exc}); "
                                                        "retry shortly") from exc
            data = join_chunks(digest, kvs)
            if data is None:
                raise ServeError(Cause.MODEL_NOT_READY, f"the model's published {name} is missing or does not match "
                                                        "its digest in etcd; retry shortly")
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        log.info("tokenizer files %s fetched from etcd into %s", sorted(files), folder)
        return folder

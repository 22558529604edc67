"""Keeps the served models in step with the repository folder.

Modes (Triton's --model-control-mode): `none` loads everything at start and never
changes; `poll` watches the folder (watchdog events, debounced, plus a rescan every
--repository-poll-secs) and loads, reloads or unloads what changed; `explicit` loads only
--load-model names and RepositoryModelLoad/Unload calls.

A reload starts the new engines beside the serving ones and switches only once they are
all READY; if the new config or weights fail, the old version keeps serving and its
index entry carries the reason.

The versions that serve are published in etcd (cluster/publisher.py), and a model this node's
repository does not hold is served from the configs other nodes publish (the registry view):
a router-only node, started with an empty repository, serves every model of its cluster.
A local model always wins over a published one of the same name.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
from dataclasses import dataclass, field

from pdserve.cluster.model_files import read_tokenizer_files
from pdserve.cluster.publisher import ModelPublisher
from pdserve.common.errors import Cause, ServeError
from pdserve.common.records import ModelRecord
from pdserve.repository.config import ConfigError, config_to_json, fingerprint, load_model_spec, published_spec
from pdserve.repository.supervisor import Deployment, EngineStartError, Supervisor

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0


class ModelState(str, enum.Enum):
    """Triton's model states, as RepositoryIndex reports them."""
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


@dataclass
class VersionStatus:
    version: str
    state: ModelState
    reason: str = ""


@dataclass
class ModelEntry:
    """What the server knows of one model: what serves, what loads, what failed."""
    name: str
    serving: dict[int, Deployment] = field(default_factory=dict)
    loading: dict[int, Deployment] = field(default_factory=dict)
    unloading: dict[int, Deployment] = field(default_factory=dict)
    wanted: bool = False                   # loading it was asked for (start, poll, explicit load) and not undone
    fingerprint: str = ""                  # of the folder contents last acted on
    reason: str = ""                       # why the last load failed, if it did
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def statuses(self) -> list[VersionStatus]:
        out: dict[int, VersionStatus] = {}
        for v in self.unloading:
            out[v] = VersionStatus(str(v), ModelState.UNLOADING)
        for v in self.serving:
            out[v] = VersionStatus(str(v), ModelState.READY, self.reason)
        for v in self.loading:
            if v not in self.serving:
                out[v] = VersionStatus(str(v), ModelState.LOADING)
        if not out:
            return [VersionStatus("", ModelState.UNAVAILABLE, self.reason or "unloaded")]
        return [out[v] for v in sorted(out)]

    @property
    def settled(self) -> bool:
        """For server readiness: serving, or not asked to (unloaded, never loaded)."""
        return bool(self.serving) if self.wanted else True


def _version_number(version: str) -> int:
    if not version.isdigit():
        raise ServeError(Cause.INVALID_ARGUMENT,
                         f"model_version '{version}' is not a version number; send digits or leave it empty")
    return int(version)


class ModelRepositoryManager:
    def __init__(self, repository: str, supervisor: Supervisor, mode: str = "poll", poll_secs: float = 15.0,
                 startup_models: list[str] | None = None, publisher: ModelPublisher | None = None):
        self.repository = os.path.abspath(repository)
        self.supervisor = supervisor
        self.publisher = publisher         # publishes what serves here; None: nothing is published
        self.view = supervisor.registry    # what the other nodes publish
        self.node = supervisor.cluster.node
        self.remote: dict[tuple[str, int], tuple[ModelRecord, Deployment]] = {}   # served from other nodes
        self.mode = mode
        self.poll_secs = poll_secs
        self.startup_models = startup_models or []
        self.models: dict[str, ModelEntry] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._observer = None
        self._closing = False

    # ---- queries ---------------------------------------------------------------------
    def folder_names(self) -> list[str]:
        try:
            return sorted(d for d in os.listdir(self.repository)
                          if os.path.isdir(os.path.join(self.repository, d)) and not d.startswith("."))
        except FileNotFoundError:
            return []

    def index(self) -> list[tuple[str, VersionStatus]]:
        local = set(self.folder_names()) | set(self.models)
        rows = []
        for name in sorted(local | self.remote_names()):
            if name in local:
                entry = self.models.get(name) or ModelEntry(name)
                rows += [(name, status) for status in entry.statuses()]
            else:
                rows += [(name, status) for status in self._remote_statuses(name)]
        return rows

    def get(self, name: str, version: str = "") -> Deployment:
        """The deployment that serves name at version ("" for the newest ready one), as Triton's
        GetModel: raises ServeError (unknown model, unknown version, not ready)."""
        if not name:
            raise ServeError(Cause.INVALID_ARGUMENT, "model_name is empty; name the model to call")
        entry = self.models.get(name)
        if entry is None and not self.local(name):
            return self._get_remote(name, version)
        serving = entry.serving if entry else {}
        if version:
            v = _version_number(version)
            if v in serving:
                return serving[v]
            if entry and (v in entry.loading or v in entry.unloading):
                state = ModelState.LOADING if v in entry.loading else ModelState.UNLOADING
                raise ServeError(Cause.MODEL_NOT_READY, f"Request for model '{name}' version {v}: the version is "
                                                        f"not ready ({state.value}); retry shortly")
            available = ", ".join(str(x) for x in sorted(serving)) or "none"
            raise ServeError(Cause.MODEL_NOT_FOUND,
                             f"Request for unknown model: '{name}' version {v} is not found; ready versions: {available}")
        if not serving:
            why = f": {entry.reason}" if entry and entry.reason else ""
            state = " (loading)" if entry and entry.loading else ""
            raise ServeError(Cause.MODEL_NOT_FOUND,
                             f"Request for unknown model: '{name}' has no available versions{state}{why}")
        return serving[max(serving)]

    def ready_versions(self, name: str) -> list[int]:
        entry = self.models.get(name)
        if entry is None and not self.local(name):
            return [v for v in sorted(self._published(name)) if self.view.can_generate(name, str(v))]
        return sorted(entry.serving) if entry else []

    def all_ready(self) -> bool:
        """Server readiness: every model asked for serves."""
        return all(entry.settled for entry in self.models.values())

    def local(self, name: str) -> bool:
        """The model is this node's own (its repository's), served or not."""
        return name in self.models or name in self.folder_names()

    def knows(self, name: str) -> bool:
        return self.local(name) or name in self.remote_names()

    # ---- models other nodes serve ------------------------------------------------------------
    def remote_names(self) -> set[str]:
        """Models other nodes publish now or did since this node started (those listed UNAVAILABLE)."""
        return {name for name, nodes in self.view.model_nodes.items() if nodes - {self.node}}

    def _published(self, name: str) -> dict[int, ModelRecord]:
        """Per version of name that other nodes publish, the newest record."""
        out: dict[int, ModelRecord] = {}
        for record in self.view.published(name):
            if record.node != self.node and record.version.isdigit():
                v = int(record.version)
                if v not in out or record.published > out[v].published:
                    out[v] = record
        return out

    def _not_ready(self, records: list[ModelRecord]) -> str:
        nodes = ", ".join(sorted({r.node for r in records}))
        return (f"published by node {nodes}, but no engine of it that can generate (DECODE or BOTH) is ready "
                "in the cluster")

    def _remote_statuses(self, name: str) -> list[VersionStatus]:
        published = self._published(name)
        if not published:
            nodes = ", ".join(sorted(self.view.model_nodes.get(name, set()) - {self.node}))
            return [VersionStatus("", ModelState.UNAVAILABLE, f"no node of the cluster serves it now (last "
                                                              f"published by node {nodes})")]
        return [VersionStatus(str(v), ModelState.READY) if self.view.can_generate(name, str(v))
                else VersionStatus(str(v), ModelState.UNAVAILABLE, self._not_ready([r]))
                for v, r in sorted(published.items())]

    def _get_remote(self, name: str, version: str) -> Deployment:
        """get() for a model only other nodes hold: served from their published config and the
        cluster's engines; ready while one of its engines can generate."""
        published = self._published(name)
        if not published:
            if name not in self.remote_names():
                raise ServeError(Cause.MODEL_UNKNOWN, f"Request for unknown model: '{name}' is not found")
            raise ServeError(Cause.MODEL_NOT_READY, f"Request for model '{name}': {self._remote_statuses(name)[0].reason}"
                                                    "; retry when a node serves it")
        ready = [v for v in sorted(published) if self.view.can_generate(name, str(v))]
        if version:
            v = _version_number(version)
            if v not in published:
                raise ServeError(Cause.MODEL_NOT_FOUND, f"Request for unknown model: '{name}' version {v} is not "
                                                        f"found; versions the cluster serves: "
                                                        f"{', '.join(map(str, sorted(published)))}")
            if v not in ready:
                raise ServeError(Cause.MODEL_NOT_READY, f"Request for model '{name}' version {v}: the version is "
                                                        f"{self._not_ready([published[v]])}; retry shortly")
        elif ready:
            v = ready[-1]
        else:
            raise ServeError(Cause.MODEL_NOT_READY, f"Request for model '{name}': the model is "
                                                    f"{self._not_ready(list(published.values()))}; retry shortly")
        return self._remote_deployment(published[v])

    def _remote_deployment(self, record: ModelRecord) -> Deployment:
        """One Deployment per published config (so its in-flight count lasts), with no engines of its own."""
        key = (record.model, int(record.version))
        known = self.remote.get(key)
        if known is not None and (known[0].config, known[0].files) == (record.config, record.files):
            return known[1]
        try:
            spec = published_spec(record.model, int(record.version), record.config)
        except ConfigError as exc:
            raise ServeError(Cause.MODEL_NOT_READY, f"Request for model '{record.model}' version {record.version}: "
                                                    f"{exc} (node {record.node})") from exc
        dep = Deployment(spec, int(record.version), [], self.supervisor)
        self.remote[key] = (record, dep)
        return dep

    def remote_record(self, dep: Deployment) -> ModelRecord | None:
        """The record another node published for a deployment this node serves from it (None: the
        model is this node's own)."""
        known = self.remote.get((dep.name, dep.version))
        return known[0] if known is not None and known[1] is dep else None

    def all_deployments(self) -> list[Deployment]:
        out = []
        for entry in self.models.values():
            out += list(entry.serving.values()) + list(entry.loading.values()) + list(entry.unloading.values())
        return out

    # ---- start and stop ------------------------------------------------------------------
    async def start(self) -> None:
        names = self.startup_models if self.mode == "explicit" else self.folder_names()
        await asyncio.gather(*(self.load(name) for name in names), return_exceptions=True)
        if self.mode == "poll":
            self._start_watchdog()
            self._spawn(self._poll_loop())

    async def close(self) -> None:
        self._closing = True
        if self._observer is not None:
            self._observer.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(d.stop() for d in self.all_deployments()), return_exceptions=True)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- poll mode ----------------------------------------------------------------------
    def _start_watchdog(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        loop = asyncio.get_running_loop()
        wake = self._wake

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                loop.call_soon_threadsafe(wake.set)

        os.makedirs(self.repository, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(Handler(), self.repository, recursive=True)
        self._observer.daemon = True
        self._observer.start()

    async def _poll_loop(self) -> None:
        debounce = min(1.0, self.poll_secs)
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_secs)
                # Debounce: a copy of a model folder fires many events; act once it settles.
                while True:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=debounce)
                    except asyncio.TimeoutError:
                        break
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.rescan()

    async def rescan(self) -> None:
        """Poll mode: load new folders, reload changed ones, unload removed ones."""
        folders = set(self.folder_names())
        jobs = []
        for name in folders:
            entry = self.models.get(name)
            model_dir = os.path.join(self.repository, name)
            if entry is None or (fingerprint(model_dir) != entry.fingerprint and not entry.lock.locked()):
                jobs.append(self.load(name))
        for name in set(self.models) - folders:
            if self.models[name].serving or self.models[name].loading:
                jobs.append(self.unload(name))
            elif not self.models[name].lock.locked():
                del self.models[name]
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)

    # ---- load, reload, unload -------------------------------------------------------------
    async def load(self, name: str) -> None:
        """Loads or reloads a model; raises ConfigError or EngineStartError when it fails."""
        entry = self.models.setdefault(name, ModelEntry(name))
        entry.wanted = True
        async with entry.lock:
            model_dir = os.path.join(self.repository, name)
            entry.fingerprint = fingerprint(model_dir) if os.path.isdir(model_dir) else ""
            try:
                if not os.path.isdir(model_dir):
                    raise ConfigError(f"{model_dir}: no such model folder in the repository")
                spec = load_model_spec(model_dir)
            except ConfigError as exc:
                self._failed(entry, str(exc))
                raise
            new = {v: self.supervisor.deployment(spec, v) for v in spec.versions}
            entry.loading = new
            log.info("loading %s versions %s (%d engines each)", name, spec.versions, len(spec.instances))
            try:
                await asyncio.gather(*(d.start() for d in new.values()))
                await asyncio.gather(*(d.activate() for d in new.values()))
            except BaseException as exc:
                entry.loading = {}
                await asyncio.gather(*(d.stop() for d in new.values()), return_exceptions=True)
                self._failed(entry, f"{model_dir}: {exc}")
                if isinstance(exc, (EngineStartError, asyncio.CancelledError)):
                    raise
                raise EngineStartError(str(exc)) from exc
            old = entry.serving
            entry.serving, entry.loading, entry.reason = new, {}, ""
            self._publish(entry)
            log.info("model %s versions %s READY", name, spec.versions)
        if old:
            await self._retire(entry, old)

    def _publish(self, entry: ModelEntry) -> None:
        """Tells the cluster what serves here now (every change of entry.serving comes here)."""
        if self.publisher is not None:
            self.publisher.serve(entry.name, {v: config_to_json(d.spec.config) for v, d in entry.serving.items()},
                                 {v: read_tokenizer_files(os.path.join(d.spec.path, str(v)))
                                  for v, d in entry.serving.items()})

    def _failed(self, entry: ModelEntry, reason: str) -> None:
        if entry.serving:
            entry.reason = f"the last reload failed, the previous configuration keeps serving: {reason}"
        else:
            entry.reason = reason
        log.error("model %s: %s", entry.name, entry.reason)

    async def _retire(self, entry: ModelEntry, old: dict[int, Deployment]) -> None:
        """Old deployments stop taking requests, finish those they have, then stop."""
        entry.unloading.update({v: d for v, d in old.items()})
        try:
            await asyncio.gather(*(d.drain(DRAIN_TIMEOUT_S) for d in old.values()))
            await asyncio.gather(*(d.stop() for d in old.values()))
        finally:
            for v, d in old.items():
                if entry.unloading.get(v) is d:
                    del entry.unloading[v]

    async def unload(self, name: str) -> None:
        entry = self.models.get(name)
        if entry is None:
            return
        entry.wanted = False
        async with entry.lock:
            old = entry.serving
            entry.serving = {}
            self._publish(entry)
            entry.reason = "unloaded"
            entry.fingerprint = ""
        await self._retire(entry, old)
        if not os.path.isdir(os.path.join(self.repository, name)) and not entry.serving:
            self.models.pop(name, None)

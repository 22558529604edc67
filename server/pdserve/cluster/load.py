"""The load plane: what this front end knows of each engine's load and KV cache.

Every engine of the cluster (the registry's, and this node's own) is asked for its Stats each
STATS_POLL_S, whether or not metrics are served. Each answer, whoever asked (this poll, the
planner, a drain), lands here through the clients' StatsWatcher hook (cluster/engine_client.py):
  - its load figures, plus what this front end sent the engine since the call went out, make
    the engine's `load` (FreshLoad), which the router reads and is told of (listen());
  - its KV events (engine/kv_events.py) go into the node's KVIndex (cluster/kv_index.py), and
    the hashes it put in the cluster's KV store (engine/kv_store.py) into store_index;
  - the answer itself, and when it came, are kept for the metrics and the stall watchdog.

A late answer (a newer call already answered) changes nothing; one that comes after the
engine's KV view started over (a new process at its address, see sync()) keeps its load
figures but not its KV events.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from pdserve._proto import engine_pb2
from pdserve.cluster.engine_client import EngineClient, EngineClients
from pdserve.cluster.kv_index import KVIndex

# An engine's load is counted in prompt tokens of work: its queued prefill tokens, plus this
# many tokens for each request it runs or queues (a request in a decode batch slows every step;
# one queued weighs like this many prompt tokens more to compute).
REQUEST_TOKENS = 256
# Added to the load of an engine that could not be reached lately: it is chosen only when no
# other engine is left, and suspect engines still keep their order among themselves.
SUSPECT_PENALTY = 1e12
STATS_POLL_S = 1.0

LoadListener = Callable[[str, float], None]   # (address, load)
UNSYNCED = object()   # an engine's incarnation before the router's first look at the registry


def answer_load(stats: engine_pb2.StatsResponse) -> float:
    """The load a Stats answer tells: queued prompt tokens + REQUEST_TOKENS x requests (running,
    queued, awaiting their KV) + the share of KV blocks in use (< 1 token: it only breaks ties)."""
    used = 1.0 - stats.num_free_blocks / stats.num_total_blocks if stats.num_total_blocks else 0.0
    return (stats.waiting_prefill_tokens + 0.5 * used
            + REQUEST_TOKENS * (stats.num_running + stats.num_waiting + stats.num_awaiting_kv))


@dataclass(slots=True)
class FreshLoad:
    """One engine's load: its last Stats answer's, plus what this front end sent it since (a
    burst between two answers must not all land on one engine), less what ended since.

    Times are the caller's clock readings (no clock here). Mutable rather than frozen: it
    changes twice per routed request, on the router's hot path."""

    sent_tokens: int = 0        # totals of what this front end sent the engine
    sent_requests: int = 0
    base_tokens: int = 0        # ... and their values when the last answer's call went out
    base_requests: int = 0      #     (that answer already counts the rest)
    answer_load: float = 0.0    # the last answer's part of the load
    answer_waiting: int = 0     # its queued prompt tokens, less those of requests ended since
    asked_at: float = 0.0       # when the last answer's call went out

    @property
    def fresh_tokens(self) -> int:
        """Prompt tokens sent to compute since the last answer's call went out."""
        return self.sent_tokens - self.base_tokens

    @property
    def fresh_requests(self) -> int:
        return self.sent_requests - self.base_requests

    @property
    def load(self) -> float:
        return (self.answer_load + self.sent_tokens - self.base_tokens
                + REQUEST_TOKENS * (self.sent_requests - self.base_requests))

    def sent(self, tokens: int, requests: int = 1) -> None:
        """`requests` requests with `tokens` prompt tokens to compute went to the engine."""
        self.sent_tokens += tokens
        self.sent_requests += requests

    def finished(self, tokens: int, sent_at: float, requests: int = 1) -> None:
        """A request sent at `sent_at` ended (its prompt is computed). It leaves the load at
        once instead of at the next answer: from the fresh load if no answer has counted it,
        else from the last answer's figures (which counted it queued or running)."""
        if self.asked_at < sent_at:
            self.base_tokens = min(self.base_tokens + tokens, self.sent_tokens)
            self.base_requests = min(self.base_requests + requests, self.sent_requests)
        else:
            counted = min(tokens, self.answer_waiting)
            self.answer_waiting -= counted
            self.answer_load = max(self.answer_load - counted - REQUEST_TOKENS * requests, 0.0)

    def answered(self, stats: engine_pb2.StatsResponse, asked_at: float,
                 sent_before: tuple[int, int] | None = None) -> None:
        """A Stats answer whose call went out at `asked_at`, when the totals sent were
        `sent_before` (None: now): it counts those; what was sent after stays fresh."""
        self.asked_at = asked_at
        self.answer_waiting = stats.waiting_prefill_tokens
        self.base_tokens, self.base_requests = sent_before or (self.sent_tokens, self.sent_requests)
        self.answer_load = answer_load(stats)


@dataclass(frozen=True, slots=True)
class PrefillQueue:
    """An engine's prompt work as the load plane sees it: the prompt tokens it has yet to compute
    (its last answer's, less those ended since, plus those sent since) and its recent prefill
    speed (0: not measured yet)."""
    queued_tokens: int
    tokens_per_s: float


@dataclass(slots=True, eq=False)
class EngineFigures:
    """What the load plane knows of the engine at one address."""

    fresh: FreshLoad
    load: float = 0.0           # fresh.load, + SUSPECT_PENALTY while the engine is suspect
    suspect: bool = False       # calls could not reach it lately (EngineClient.suspect)
    last_stats: engine_pb2.StatsResponse | None = None
    last_stats_at: float = 0.0  # the plane's clock when last_stats came; 0: never
    kv_cursor: int = 0          # the newest KV event id applied (0: none, ask for the whole set)
    store_cursor: int = 0       # the same for the engine's KV store events
    kv_epoch: int = 0           # bumped when the KV view starts over: late answers are not applied
    incarnation: object = UNSYNCED   # of the engine at this address, as the registry said
    answered: int = 0           # the newest Stats call applied


@dataclass(frozen=True, slots=True)
class _Ask:
    """A Stats call on its way: handed back with its answer."""
    figures: EngineFigures
    call: int
    kv_epoch: int
    sent: tuple[int, int]       # the totals sent when it went out
    at: float


class LoadPlane(EngineClients):
    """The node's engine clients, and what their Stats answers and this front end's requests
    say of each engine's load. Clients made here report every Stats call to the plane."""

    def __init__(self, token: str = "", clock: Callable[[], float] = time.monotonic,
                 poll_s: float = STATS_POLL_S):
        super().__init__(token, watcher=self)
        self.clock = clock
        self.poll_s = poll_s
        self.kv_index = KVIndex()
        self.store_index = KVIndex()   # block hashes in the cluster's KV store, by the engine that put them
        self._figures: dict[str, EngineFigures] = {}
        self._listeners: list[LoadListener] = []
        self._calls = itertools.count(1)
        self._poller: asyncio.Task | None = None

    # ---- reading ----

    def listen(self, listener: LoadListener) -> None:
        """listener(address, load) after every change of an engine's load (0 when it is forgotten)."""
        self._listeners.append(listener)

    def figures(self, address: str) -> EngineFigures:
        """What the plane knows of the engine at `address` (nothing yet at first sight)."""
        figures = self._figures.get(address)
        if figures is None:
            figures = self._figures[address] = EngineFigures(FreshLoad())
        return figures

    def load_of(self, address: str) -> float:
        figures = self._figures.get(address)
        return figures.load if figures is not None else 0.0

    def prefill_queue(self, address: str) -> PrefillQueue:
        figures = self._figures.get(address)
        if figures is None:
            return PrefillQueue(0, 0.0)
        fresh, stats = figures.fresh, figures.last_stats
        return PrefillQueue(fresh.answer_waiting + fresh.fresh_tokens, stats.prefill_tokens_per_second if stats else 0.0)

    def last_stats(self, address: str) -> engine_pb2.StatsResponse | None:
        figures = self._figures.get(address)
        return figures.last_stats if figures is not None else None

    # ---- what this front end sends ----

    def sent(self, address: str, tokens: int, requests: int = 1) -> None:
        """This front end sent the engine `requests` requests with `tokens` prompt tokens to compute."""
        figures = self._figures.get(address) or self.figures(address)
        figures.fresh.sent(tokens, requests)
        self._update(address, figures)

    def finished(self, address: str, tokens: int, sent_at: float, requests: int = 1) -> None:
        """A request sent at self.clock() `sent_at` ended: see FreshLoad.finished."""
        figures = self._figures.get(address) or self.figures(address)
        figures.fresh.finished(tokens, sent_at, requests)
        self._update(address, figures)

    # ---- what the engines answer ----

    def observe(self, address: str, stats: engine_pb2.StatsResponse, sent_before: tuple[int, int] | None = None,
                apply_kv: bool = True, asked_at: float | None = None) -> None:
        """Takes one Stats answer of the engine: its load figures (what was sent before the
        call went out, `sent_before`, is counted in them), its KV events, and that it answered."""
        figures = self.figures(address)
        now = self.clock()
        figures.last_stats, figures.last_stats_at = stats, now
        figures.fresh.answered(stats, now if asked_at is None else asked_at, sent_before)
        if apply_kv:
            self.kv_index.apply(address, stats.stored_block_hashes, stats.removed_block_hashes,
                                stats.kv_events_reset)
            figures.kv_cursor = stats.kv_event_id
            self.store_index.apply(address, stats.store_stored_hashes, stats.store_removed_hashes,
                                   stats.store_events_reset)
            figures.store_cursor = stats.store_event_id
        figures.suspect = False   # it answers again
        self._update(address, figures)

    def stats_request(self, address: str) -> tuple[engine_pb2.StatsRequest, _Ask]:
        figures = self.figures(address)
        fresh = figures.fresh
        ask = _Ask(figures, next(self._calls), figures.kv_epoch, (fresh.sent_tokens, fresh.sent_requests),
                   self.clock())
        return engine_pb2.StatsRequest(kv_events_after=figures.kv_cursor, store_events_after=figures.store_cursor), ask

    def stats_answered(self, address: str, ask: _Ask, stats: engine_pb2.StatsResponse) -> None:
        figures = self._figures.get(address)
        if figures is not ask.figures or ask.call < figures.answered:
            return   # the engine was forgotten meanwhile, or a newer call answered first
        figures.answered = ask.call
        self.observe(address, stats, ask.sent, apply_kv=ask.kv_epoch == figures.kv_epoch, asked_at=ask.at)

    def suspect(self, address: str) -> bool:
        figures = self._figures.get(address)
        return figures is not None and figures.suspect

    def set_suspect(self, address: str, suspect: bool) -> None:
        figures = self._figures.get(address)   # none: it was forgotten, a late report changes nothing
        if figures is not None and figures.suspect != suspect:
            figures.suspect = suspect
            self._update(address, figures)

    def _update(self, address: str, figures: EngineFigures) -> None:
        figures.load = figures.fresh.load + (SUSPECT_PENALTY if figures.suspect else 0.0)
        for listener in self._listeners:
            listener(address, figures.load)

    # ---- engines coming and going ----

    def get(self, address: str) -> EngineClient:
        client = self._clients.get(address)
        if client is None:
            self.figures(address)   # known from its first client on: sync() sees it
            client = super().get(address)
        return client

    def sync(self, engines: dict[str, str]) -> None:
        """The registry changed; `engines` maps each engine address to the incarnation there
        now. An engine that left, or was replaced by a new process at the same address, has
        its KV view forgotten (a former process's blocks must not attract requests)."""
        for address, figures in self._figures.items():
            incarnation = engines.get(address)
            if incarnation != figures.incarnation:
                # a first look: the view is of this incarnation, unless the engine left
                if figures.incarnation is not UNSYNCED or incarnation is None:
                    self._forget_kv(address, figures)
                figures.incarnation = incarnation

    def _forget_kv(self, address: str, figures: EngineFigures) -> None:
        """Its blocks are forgotten and the next Stats call asks for the whole set."""
        self.kv_index.drop(address)
        self.store_index.drop(address)
        figures.kv_cursor = figures.store_cursor = 0
        figures.kv_epoch += 1

    def forget(self, address: str) -> None:
        """The engine stopped: its figures and blocks go, its load reads 0."""
        if self._figures.pop(address, None) is not None:
            self.kv_index.drop(address)
            self.store_index.drop(address)
            for listener in self._listeners:
                listener(address, 0.0)

    async def drop(self, address: str) -> None:
        self.forget(address)
        await super().drop(address)

    # ---- the poll ----

    async def poll(self, addresses: Iterable[str]) -> None:
        """One round: a Stats call to each engine (answers and failures land here)."""
        await asyncio.gather(*(self.get(a).stats() for a in addresses), return_exceptions=True)

    def start(self, addresses: Callable[[], Iterable[str]]) -> None:
        """Polls the engines `addresses()` names, every poll_s, until stop()."""
        self._poller = asyncio.ensure_future(self._run(addresses))

    async def _run(self, addresses: Callable[[], Iterable[str]]) -> None:
        while True:
            await self.poll(addresses())
            await asyncio.sleep(self.poll_s)

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None

    async def close(self) -> None:
        self.stop()
        await super().close()

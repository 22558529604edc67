"""Chooses the engines that serve a request, across every node of the cluster.

Per request: a DECODE (or BOTH) engine, and, when the choice is a DECODE engine and a PREFILL
engine is alive, a PREFILL engine. No prefill engine: the decode engine prefills locally. No
engine that can generate: UNAVAILABLE at once.

Each engine's load is one number in prompt tokens of work, kept by the load plane
(cluster/load.py: queued prefill tokens plus REQUEST_TOKENS per running or queued request, from
its last Stats answer plus what this front end sent it since). Policies (round_robin,
least_load, kv_aware) choose in an EngineGroup: the READY engines of one model version on one
side (decode: BOTH and DECODE; prefill: PREFILL), listed once when the registry changes, whose
loads sit in an array that the load plane keeps current, so a choice costs no scan in Python
over the engines.

kv_aware (the default; the cost of Dynamo's KV router, in tokens): cost = load - the tokens of
the prompt's leading blocks the engine holds (cluster/kv_index.py), the least cost wins. With no
block held anywhere it is least_load. It serves the prefill choice (where the prompt is
computed) and the decode choice (a decode engine that holds the prefix receives less KV).
Blocks in the cluster's KV store (kv_store: mooncake; LoadPlane.store_index, by the engines
that put them) are cheap, not free: any engine of the group loads them, so beyond an engine's
own blocks each counts STORE_BLOCK_WEIGHT of a block it holds.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from pdserve.cluster.engine_client import EngineClient
from pdserve.cluster.load import SUSPECT_PENALTY, LoadPlane, PrefillQueue
from pdserve.cluster.registry import RegistryView
from pdserve.common.errors import Cause, ServeError
from pdserve.common.records import READY, EngineRecord

DECODE, PREFILL = "decode", "prefill"
SIDE_ROLES = {DECODE: ("BOTH", "DECODE"), PREFILL: ("PREFILL",)}
INF = float("inf")


class EngineGroup:
    """The READY engines of one model version on one side, in instance-id order, with their
    loads in `load` (kept current by Router._load_changed) and their KV block size (None when
    they disagree or do not say)."""

    __slots__ = ("key", "records", "load", "by_id", "by_address", "block_size", "max_model_len")

    def __init__(self, key: tuple[str, str, str], records: list[EngineRecord], loads: list[float]):
        self.key = key
        self.records = tuple(records)
        self.load = np.array(loads, dtype=np.float64)
        self.by_id = {r.instance_id: i for i, r in enumerate(records)}
        self.by_address = {r.address: i for i, r in enumerate(records)}
        sizes = {r.capacity.get("block_size") for r in records}
        size = sizes.pop() if len(sizes) == 1 else None
        self.block_size = size if isinstance(size, int) and size > 0 else None
        lengths = [r.capacity.get("max_model_len") for r in records]
        self.max_model_len = min((n for n in lengths if isinstance(n, int) and n > 0), default=None)

    def loads(self, exclude: frozenset[str]) -> np.ndarray:
        """The loads, with the excluded engines at infinity (a copy only when some are)."""
        slots = [i for e in exclude if (i := self.by_id.get(e)) is not None] if exclude else ()
        if not slots:
            return self.load
        load = self.load.copy()
        load[slots] = INF
        return load


class RoundRobinPolicy:
    """Takes the engines in turn, one turn counter per model version and side; excluded
    engines are skipped, suspect ones taken only when nothing else is left."""

    uses_prefix = False

    def __init__(self):
        self._turns: dict[tuple[str, str, str], itertools.count] = defaultdict(itertools.count)

    def choose(self, group: EngineGroup, load: np.ndarray, matched: dict[str, int] | None = None) -> int:
        n = len(group.records)
        start = next(self._turns[group.key])
        fallback = -1
        for k in range(n):
            i = (start + k) % n
            if load[i] < SUSPECT_PENALTY:
                return i
            if fallback < 0 and load[i] < INF:
                fallback = i
        return fallback


class LeastLoadPolicy:
    """The engine with the lowest load; ties are broken in turn (the first lowest after the
    engine chosen last in this group)."""

    uses_prefix = False

    def __init__(self):
        self._last: dict[tuple[str, str, str], int] = {}

    def choose(self, group: EngineGroup, load: np.ndarray, matched: dict[str, int] | None = None) -> int:
        start = self._last.get(group.key, -1) + 1
        if start >= len(load):
            start = 0
        i = start + int(load[start:].argmin())
        if start:
            j = int(load[:start].argmin())
            if load[j] < load[i]:
                i = j
        if load[i] == INF:
            return -1
        self._last[group.key] = i
        return i


# matched's keys for the KV store: STORE + the address of an engine that put the prompt's leading blocks there
STORE = "store:"
# A block an engine loads from the KV store instead of computing it, counted against one in its pool
STORE_BLOCK_WEIGHT = 0.5


class KVAwarePolicy(LeastLoadPolicy):
    """Least cost, cost = load - cached tokens of this prompt on the engine (overlap_weight
    per token); a holder wins a tie against an engine holding less. No block held anywhere, or
    no prompt hashes (no tokenizer on this node): least_load."""

    uses_prefix = True

    def __init__(self, overlap_weight: float = 1.0):
        super().__init__()
        self.overlap_weight = overlap_weight

    def choose(self, group: EngineGroup, load: np.ndarray, matched: dict[str, int] | None = None) -> int:
        i = super().choose(group, load)
        if i < 0 or not matched or group.block_size is None:
            return i
        weight = self.overlap_weight * group.block_size
        by_address = group.by_address
        # the store's leading blocks of the prompt, as engines of this group (this model) put them
        stored = max((b for k, b in matched.items() if k.startswith(STORE) and k[len(STORE):] in by_address),
                     default=0)

        def credit(blocks: int) -> float:
            return blocks + STORE_BLOCK_WEIGHT * max(stored - blocks, 0)
        best_blocks = matched.get(group.records[i].address, 0)
        best_cost = load[i] - weight * credit(best_blocks)
        for address, blocks in matched.items():
            j = by_address.get(address)
            if j is None or blocks <= 0:
                continue
            cost = load[j] - weight * credit(blocks)
            if cost < best_cost or (cost == best_cost and blocks > best_blocks):
                i, best_cost, best_blocks = j, cost, blocks
        return i


# The model parameter's default, measured by bench/local_prefill.py on the demo PD: the longest
# uncached length whose local prefill beats the handoff's TTFT while the decodes it shares steps
# with keep their p99 inter-token gap within the TPOT SLO (docs/cluster.md).
DEFAULT_MAX_LOCAL_PREFILL_TOKENS = 32


def prefill_locally(uncached_tokens: int, max_local_prefill_tokens: int, local: PrefillQueue | None = None,
                    remote: Iterable[PrefillQueue] = ()) -> bool:
    """Disaggregation only where it pays: a DECODE engine computes a prompt itself when the part
    of it that the engine does not cache is this short, because a handoff (a Prefill call, a
    wake-up of the prefill engine, the KV written across) then costs more than the compute.

    Or when the handoff is slower for the queue alone: the prompt would wait in every PREFILL
    engine's queue (`remote`: queued tokens / speed) longer than the decode engine (`local`)
    takes to compute its own queue and then the prompt. A handoff spares the decodes the
    prompt's steps, so it keeps the prompt until that wait, not merely the TTFT, is lost. A
    PREFILL engine whose speed is not measured yet is taken to be free (hand off); the decode
    engine's, to be the prefill engine's. With max_local_prefill_tokens < 0 it always hands off."""
    if uncached_tokens <= max_local_prefill_tokens:
        return True
    if max_local_prefill_tokens < 0 or local is None:
        return False
    local_s = None
    for queue in remote:   # stops at the first engine worth the handoff
        if not queue.tokens_per_s:
            return False
        if local_s is None:
            local_s = (local.queued_tokens + uncached_tokens) / (local.tokens_per_s or queue.tokens_per_s)
        if queue.queued_tokens / queue.tokens_per_s <= local_s:
            return False
    return local_s is not None


POLICIES = {"kv_aware": KVAwarePolicy, "least_load": LeastLoadPolicy, "round_robin": RoundRobinPolicy}
DEFAULT_POLICY = "kv_aware"
RECENT_ROUTES = 4096         # prompts whose route kv_aware remembers ...
RECENT_ROUTE_TTL_S = 30.0    # ... until the engines' own KV events have long reported them


@dataclass(frozen=True)
class Route:
    decode: EngineRecord
    prefill: EngineRecord | None = None   # None: the decode engine prefills itself
    prefill_tokens: int = 0   # tokens the prefilling engine is expected to compute (its cached prefix left out)
    client: EngineClient | None = field(default=None, compare=False, repr=False)   # the decode engine's

    @property
    def instance_ids(self) -> list[str]:
        return [self.decode.instance_id] + ([self.prefill.instance_id] if self.prefill else [])


class Router:
    def __init__(self, registry: RegistryView, plane: LoadPlane, policy: str = DEFAULT_POLICY):
        self.registry = registry
        self.plane = plane
        self.policy = policy
        self.decode_policy = POLICIES[policy]()
        self.prefill_policy = POLICIES[policy]()
        self.inflight: dict[str, int] = {}   # requests this front end has on each engine
        self._generation: int | None = None       # of the registry the groups were listed from
        self._groups: dict[tuple[str, str, str], EngineGroup | None] = {}
        self._slots: dict[str, list[tuple[EngineGroup, int]]] = defaultdict(list)   # address -> its places
        plane.listen(self._load_changed)
        # The last block hash of each prompt routed lately -> (its engines, when): the next request
        # of a conversation extends the prompt, and finds it here before the engines' next Stats
        # answer reports the blocks (SGLang's router learns from its own choices the same way).
        self._recent: OrderedDict[int, tuple[tuple[str, ...], float]] = OrderedDict()

    def _matched(self, prompt_hashes: Sequence[int]) -> dict[str, int]:
        """Engine address -> leading blocks of the prompt it holds: what the engines reported
        (KVIndex), raised by what this router sent them lately."""
        matched = self.plane.kv_index.match(prompt_hashes)
        for address, blocks in self.plane.store_index.match(prompt_hashes).items():
            matched[STORE + address] = blocks
        recent = self._recent
        if recent:
            now = time.monotonic()
            for i in range(len(prompt_hashes) - 1, -1, -1):
                hit = recent.get(prompt_hashes[i])
                if hit is not None:
                    if now - hit[1] < RECENT_ROUTE_TTL_S:
                        for address in hit[0]:
                            matched[address] = max(matched.get(address, 0), i + 1)
                    break
        return matched

    def _remember(self, last_hash: int, route: "Route") -> None:
        recent = self._recent
        recent[last_hash] = ((route.decode.address,) + ((route.prefill.address,) if route.prefill else ()),
                             time.monotonic())
        recent.move_to_end(last_hash)
        if len(recent) > RECENT_ROUTES:
            recent.popitem(last=False)

    @property
    def uses_prefix(self) -> bool:
        """Whether choose() uses the prompt's block hashes (the caller tokenizes only then)."""
        return self.decode_policy.uses_prefix

    def _load_changed(self, address: str, load: float) -> None:
        for group, i in self._slots.get(address, ()):
            group.load[i] = load

    def _group(self, model: str, version: str, side: str) -> EngineGroup | None:
        generation = self.registry.generation
        if generation != self._generation:   # engines came, went or changed state: list them again
            self._generation = generation
            self._groups.clear()
            self._slots.clear()
            newest: dict[str, EngineRecord] = {}
            for r in self.registry.records.values():
                if r.address not in newest or r.started > newest[r.address].started:
                    newest[r.address] = r
            self.plane.sync({a: r.incarnation for a, r in newest.items()})
        key = (model, version, side)
        try:
            return self._groups[key]
        except KeyError:
            pass
        roles = SIDE_ROLES[side]
        records = sorted((r for r in self.registry.records.values()
                          if r.model == model and r.version == version and r.role in roles and r.state == READY),
                         key=lambda r: r.instance_id)
        group = None
        if records:
            loads = [self.plane.load_of(r.address) for r in records]
            group = EngineGroup(key, records, loads)
            for i, r in enumerate(records):
                self._slots[r.address].append((group, i))
        self._groups[key] = group
        return group

    def block_size(self, model: str, version: str) -> int | None:
        """The KV block size prompt hashes must be computed with (None: unknown, or the decode
        and prefill engines disagree)."""
        decode = self._group(model, version, DECODE)
        prefill = self._group(model, version, PREFILL)
        sizes = {g.block_size for g in (decode, prefill) if g is not None}
        return sizes.pop() if len(sizes) == 1 else None

    def max_model_len(self, model: str, version: str) -> int | None:
        """The longest sequence every ready engine of the version takes (None: none says)."""
        lengths = [g.max_model_len for g in (self._group(model, version, DECODE), self._group(model, version, PREFILL))
                   if g is not None and g.max_model_len is not None]
        return min(lengths, default=None)

    def decode_engines(self, model: str, version: str) -> int:
        """How many ready engines generate for the version (its DECODE and BOTH instances)."""
        group = self._group(model, version, DECODE)
        return len(group.records) if group is not None else 0

    def choose(self, model: str, version: str, exclude: frozenset[str] = frozenset(),
               prompt_tokens: int = 0, prompt_hashes: Sequence[int] = (),
               max_local_prefill_tokens: int = -1) -> Route:
        """exclude: instance ids that already failed this request. prompt_tokens: the prompt's
        length in tokens (an estimate will do: it counts as fresh load); prompt_hashes: its
        block hashes at block_size(model, version) (common/block_hash.py), for kv_aware.
        max_local_prefill_tokens: a DECODE engine prefills a prompt with at most this many
        tokens it does not cache itself (-1: always hand off when a PREFILL engine is ready)."""
        matched = self._matched(prompt_hashes) if prompt_hashes and self.uses_prefix else None
        decoders = self._group(model, version, DECODE)
        i = self.decode_policy.choose(decoders, decoders.loads(exclude), matched) if decoders else -1
        if i < 0:
            raise ServeError(Cause.NO_ENGINE,
                             f"model '{model}' version {version} has no live engine that can generate "
                             "(no DECODE or BOTH instance is ready in the cluster); check the engine logs "
                             "and the instance_group devices")
        decode = decoders.records[i]
        prefills = self._group(model, version, PREFILL) if decode.role == "DECODE" else None
        if prefills is not None and prefill_locally(
                self._uncached(decode, decoders, prompt_tokens, matched), max_local_prefill_tokens,
                self.plane.prefill_queue(decode.address),
                (self.plane.prefill_queue(r.address) for r in prefills.records if r.instance_id not in exclude)):
            prefills = None
        j = self.prefill_policy.choose(prefills, prefills.loads(exclude), matched) if prefills else -1
        client = self.plane.get(decode.address)
        if j < 0:   # aggregated, or no prefill engine left: the decode engine prefills locally
            route = Route(decode, None, self._uncached(decode, decoders, prompt_tokens, matched), client)
        else:
            prefill = prefills.records[j]
            route = Route(decode, prefill, self._uncached(prefill, prefills, prompt_tokens, matched), client)
        if prompt_hashes and self.uses_prefix:
            self._remember(prompt_hashes[-1], route)
        return route

    @staticmethod
    def _uncached(record: EngineRecord, group: EngineGroup, prompt_tokens: int, matched: dict[str, int] | None) -> int:
        if not matched or group.block_size is None:
            return prompt_tokens
        return max(prompt_tokens - matched.get(record.address, 0) * group.block_size, 0)

    @contextlib.contextmanager
    def track(self, chosen: Route) -> Iterator[Route]:
        """Counts a request on its engines until it ends, and as fresh load on them until
        their next Stats answer."""
        plane, inflight = self.plane, self.inflight
        if chosen.prefill is not None:
            plane.sent(chosen.prefill.address, chosen.prefill_tokens)
            plane.sent(chosen.decode.address, 0)
            ids = (chosen.decode.instance_id, chosen.prefill.instance_id)
        else:
            plane.sent(chosen.decode.address, chosen.prefill_tokens)
            ids = (chosen.decode.instance_id,)
        for instance_id in ids:
            inflight[instance_id] = inflight.get(instance_id, 0) + 1
        sent_at = plane.clock()
        try:
            yield chosen
        finally:
            # its prompt is computed: no longer fresh load, even before the next Stats answer
            plane.finished(chosen.prefill.address if chosen.prefill else chosen.decode.address,
                           chosen.prefill_tokens, sent_at)
            if chosen.prefill is not None:
                plane.finished(chosen.decode.address, 0, sent_at)
            for instance_id in ids:
                n = inflight[instance_id] - 1
                if n:
                    inflight[instance_id] = n
                else:
                    del inflight[instance_id]

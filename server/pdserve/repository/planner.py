"""Elastic roles: the planner that switches AUTO engines between PREFILL, DECODE and BOTH from measured load.

Every engine with a KV transport can act as either side of PD: its role is what its etcd record
says, and routers route by the record. An instance group with `role: AUTO` starts its engines with
a transport and an initial split (`initial_roles`), and the node that started them runs one
`Planner` per model version. Every `planner_interval_s` it asks each engine of the model version
(on any node) for its Stats and hands the figures to `decide`, a pure function of the engines'
load, their roles, the thresholds and the history of earlier polls:

- prefill pressure: queued prompt tokens per prefilling engine at or above
  `planner_prefill_queue_high`, while the decoders are light enough that one fewer still runs
  fewer than `planner_decode_seqs_high` sequences each (and, with `planner_tpot_high_s`, decode
  steps are faster than that): one DECODE (or BOTH) engine becomes PREFILL;
- decode pressure: running sequences per decoding engine at or above `planner_decode_seqs_high`
  (or decode steps slower than `planner_tpot_high_s`), while queued prompt tokens per prefilling
  engine are at most `planner_prefill_queue_low` and stay under the high mark with one prefill
  engine fewer: one PREFILL engine becomes DECODE (with none left, decoders prefill locally);
- an idle prefill side (xLLM's P->D flip): the same short prefill queue while the decoders run
  at least `planner_flip_decode_seqs` sequences each, below decode pressure: one PREFILL engine
  becomes BOTH, taking decodes and computing its own prompts, so a split never leaves a core idle
  that aggregated serving would use. A BOTH engine counts as a decoder: prefill pressure may make
  it PREFILL again.

Hysteresis: each figure is the median of the last `planner_window_polls` polls (a full window), a
condition must hold on `planner_hold_polls` polls in a row, at most one engine switches at a time, nothing is
decided while any engine of the version is draining, and after a switch the planner waits
`planner_cooldown_s` and starts its window afresh. There is always at least one engine that can
generate: a DECODE engine is taken only while another DECODE or BOTH engine remains.

A switch never drops a request: the engine is set `draining` (routers stop choosing it), the
planner waits until it holds no request at all (nothing running, waiting, awaiting KV or open in
its RPC), then publishes the new role with state `ready` in one record update (same key, lease
and incarnation). If it is not idle within `planner_drain_timeout_s` the switch is abandoned and
the engine made ready again in its old role. A flip to BOTH skips the drain: the engine keeps
serving every kind of work it held (a prefill call in flight finishes as before) and only starts
taking more. Switches are logged with the figures that caused them and counted
(`pdserve_role_switches_total`).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, fields, replace
from statistics import median
from typing import Protocol

from pdserve._proto import engine_pb2
from pdserve.common.records import DRAINING, READY, EngineRecord

log = logging.getLogger(__name__)

BOTH, PREFILL, DECODE, AUTO = "BOTH", "PREFILL", "DECODE", "AUTO"
DEFAULT_MAX_NUM_SEQS = 64
IDLE_POLL_S = 0.1
PARAMETER_PREFIX = "planner_"


def initial_roles(n: int) -> list[str]:
    """The starting roles of a deployment's n AUTO instances: one alone is BOTH (nothing to
    split, and the planner never switches it); several start with the first half PREFILL and the
    rest DECODE, at least one of each."""
    if n <= 1:
        return [BOTH] * n
    n_prefill = max(1, n // 2)
    return [PREFILL] * n_prefill + [DECODE] * (n - n_prefill)


@dataclass(frozen=True)
class PlannerSettings:
    """The planner's thresholds: config.pbtxt parameters `planner_<field>` (parameters())."""
    interval_s: float = 1.0
    prefill_queue_high: int = 2048   # queued prompt tokens per prefilling engine
    prefill_queue_low: int = 512
    decode_seqs_high: int = 32       # running sequences per decoding engine
    tpot_high_s: float = 0.0         # decode step time (time per output token); 0: not used
    # running sequences per decoding engine at which an idle PREFILL engine goes BOTH (0: never):
    # any decode load, since a PREFILL engine with a short queue leaves its core mostly idle
    flip_decode_seqs: int = 1
    window_polls: int = 3
    hold_polls: int = 3
    cooldown_s: float = 10.0
    drain_timeout_s: float = 30.0

    @classmethod
    def parameters(cls) -> dict[str, str]:
        """The config.pbtxt parameters that set the fields, with their types ("int", "float")."""
        return {PARAMETER_PREFIX + f.name: f.type if isinstance(f.type, str) else f.type.__name__
                for f in fields(cls)}

    @classmethod
    def from_parameters(cls, params: dict) -> "PlannerSettings":
        """From config.pbtxt parameters `planner_<field>`; unset ones take their defaults, the low
        prefill mark a quarter of the high one and the decode mark half of max_num_seqs."""
        given = {f.name: params[PARAMETER_PREFIX + f.name] for f in fields(cls) if PARAMETER_PREFIX + f.name in params}
        high = given.get("prefill_queue_high", cls.prefill_queue_high)
        given.setdefault("prefill_queue_low", high // 4)
        given.setdefault("decode_seqs_high", max(1, params.get("max_num_seqs", DEFAULT_MAX_NUM_SEQS) // 2))
        settings = cls(**given)
        return replace(settings, interval_s=max(settings.interval_s, 0.05), window_polls=max(settings.window_polls, 1),
                       hold_polls=max(settings.hold_polls, 1))


@dataclass(frozen=True)
class EngineLoad:
    """One engine of the model version as one poll saw it (its record and its Stats)."""
    instance_id: str
    role: str                       # the record's: BOTH, PREFILL, DECODE
    queued_prompt_tokens: int = 0   # Stats.waiting_prefill_tokens
    running: int = 0
    waiting: int = 0
    awaiting_kv: int = 0
    step_seconds: float = 0.0       # recent mean step time while decoding
    switchable: bool = False        # an AUTO engine this planner owns, ready
    draining: bool = False


def engine_load(record: EngineRecord, stats: engine_pb2.StatsResponse, own: bool) -> EngineLoad:
    """An engine as its record and a Stats answer show it; `own`: an AUTO engine of this planner's node."""
    return EngineLoad(record.instance_id, record.role, stats.waiting_prefill_tokens, stats.num_running,
                      stats.num_waiting, stats.num_awaiting_kv, stats.step_seconds,
                      switchable=own and record.state == READY and record.role in (PREFILL, DECODE, BOTH),
                      draining=record.state == DRAINING)


@dataclass(frozen=True)
class Figures:
    """The model version's load in one poll (or the median of several)."""
    prefill_engines: int
    decode_engines: int               # DECODE and BOTH: the engines that generate
    queued_prompt_tokens: float       # over every engine
    running: float                    # sequences running on the decoding engines
    decode_step_s: float              # mean step time of the decoding engines that run sequences

    @property
    def prefillers(self) -> int:
        """Engines that compute prompts: the PREFILL ones, or the decoders when there are none."""
        return self.prefill_engines or self.decode_engines

    @property
    def queue_per_prefill(self) -> float:
        return self.queued_prompt_tokens / max(self.prefillers, 1)

    @property
    def seqs_per_decode(self) -> float:
        return self.running / max(self.decode_engines, 1)

    def describe(self) -> str:
        step = f", decode step {self.decode_step_s * 1000:.1f} ms" if self.decode_step_s else ""
        return (f"{self.prefill_engines} PREFILL + {self.decode_engines} DECODE/BOTH; "
                f"{self.queue_per_prefill:.0f} queued prompt tokens per prefilling engine, "
                f"{self.seqs_per_decode:.1f} running sequences per decoding engine{step}")


def measure(loads: list[EngineLoad]) -> Figures:
    decoders = [e for e in loads if e.role in (DECODE, BOTH)]
    stepping = [e.step_seconds for e in decoders if e.running and e.step_seconds > 0]
    return Figures(prefill_engines=sum(e.role == PREFILL for e in loads), decode_engines=len(decoders),
                   queued_prompt_tokens=sum(e.queued_prompt_tokens for e in loads),
                   running=sum(e.running for e in decoders),
                   decode_step_s=sum(stepping) / len(stepping) if stepping else 0.0)


def smoothed(window: tuple[Figures, ...]) -> Figures:
    """The median of each figure over the window: one poll's spike (a burst caught mid-flight)
    moves it no more than one quiet poll does."""
    last = window[-1]
    return Figures(last.prefill_engines, last.decode_engines, median(f.queued_prompt_tokens for f in window),
                   median(f.running for f in window), median(f.decode_step_s for f in window))


@dataclass(frozen=True)
class History:
    """What the decision remembers between polls."""
    window: tuple[Figures, ...] = ()
    prefill_streak: int = 0           # polls in a row with prefill pressure
    decode_streak: int = 0
    last_switch: float = -math.inf    # when the last switch ended (time.monotonic())
    flip_streak: int = 0              # polls in a row with an idle prefill side (idle_prefill)


@dataclass(frozen=True)
class Switch:
    instance_id: str
    from_role: str
    to_role: str
    reason: str

    @property
    def drains(self) -> bool:
        """Whether the engine must hold nothing before its new role: not when it becomes BOTH,
        which serves whatever it holds."""
        return self.to_role != BOTH


def prefill_pressure(f: Figures, s: PlannerSettings) -> str:
    """Why one DECODE engine should prefill ("" when it should not)."""
    if f.decode_engines < 2 or f.queue_per_prefill < s.prefill_queue_high:
        return ""
    after = f.running / (f.decode_engines - 1)
    if after >= s.decode_seqs_high:
        return ""
    if s.tpot_high_s and f.decode_step_s >= s.tpot_high_s:
        return ""
    return (f"prefill pressure: {f.queue_per_prefill:.0f} queued prompt tokens per prefilling engine "
            f"(>= {s.prefill_queue_high}) while decoding is light ({after:.1f} running sequences per decoding "
            f"engine with one fewer, < {s.decode_seqs_high})")


def prefill_side_idle(f: Figures, s: PlannerSettings) -> bool:
    """The prefill queue is short, and stays under the high mark with one PREFILL engine fewer."""
    if f.prefill_engines < 1 or f.queue_per_prefill > s.prefill_queue_low:
        return False
    remaining = f.prefill_engines - 1 or f.decode_engines + 1
    return f.queued_prompt_tokens / remaining < s.prefill_queue_high


def decode_pressure(f: Figures, s: PlannerSettings) -> str:
    """Why one PREFILL engine should decode ("" when it should not)."""
    if not prefill_side_idle(f, s):
        return ""
    busy = f.seqs_per_decode >= s.decode_seqs_high
    slow = bool(s.tpot_high_s) and f.decode_step_s >= s.tpot_high_s
    if not (busy or slow):
        return ""
    why = (f"{f.seqs_per_decode:.1f} running sequences per decoding engine (>= {s.decode_seqs_high})" if busy else
           f"decode steps of {f.decode_step_s * 1000:.1f} ms (>= {s.tpot_high_s * 1000:.1f} ms)")
    return (f"decode pressure: {why} while the prefill queue is short ({f.queue_per_prefill:.0f} tokens per "
            f"prefilling engine, <= {s.prefill_queue_low})")


def idle_prefill(f: Figures, s: PlannerSettings) -> str:
    """Why one PREFILL engine should also decode, as BOTH ("" when it should not): its core idles
    between prompts while the decoders carry every stream."""
    if not s.flip_decode_seqs or not prefill_side_idle(f, s) or f.seqs_per_decode < s.flip_decode_seqs:
        return ""
    return (f"idle prefill: {f.queue_per_prefill:.0f} queued prompt tokens per prefilling engine "
            f"(<= {s.prefill_queue_low}) while the decoders run {f.seqs_per_decode:.1f} sequences each "
            f"(>= {s.flip_decode_seqs})")


def decide(loads: list[EngineLoad], settings: PlannerSettings, history: History,
           now: float) -> tuple[Switch | None, History]:
    """One poll: the switch to make now, if any, and the history for the next poll."""
    if not loads or any(e.draining for e in loads):
        return None, history    # a switch (this planner's or another node's) or a stop is under way
    figures = measure(loads)
    window = history.window
    if window and (window[-1].prefill_engines, window[-1].decode_engines) != (figures.prefill_engines,
                                                                              figures.decode_engines):
        window = ()             # the split changed (a switch elsewhere, an engine came or went)
    window = (window + (figures,))[-settings.window_polls:]
    smooth = smoothed(window)
    full = len(window) == settings.window_polls   # no judgement on a partial window
    prefill_why = prefill_pressure(smooth, settings) if full else ""
    decode_why = decode_pressure(smooth, settings) if full else ""
    flip_why = idle_prefill(smooth, settings) if full else ""
    # the engines each switch may take, the least busy first; a decoder is a DECODE or BOTH engine
    candidates = {side: sorted((e for e in loads if e.switchable and e.role in roles),
                               key=lambda e: (e.running + e.waiting + e.awaiting_kv, e.queued_prompt_tokens,
                                              e.instance_id))
                  for side, roles in ((PREFILL, (PREFILL,)), (DECODE, (DECODE, BOTH)))}
    prefill_streak = history.prefill_streak + 1 if prefill_why and candidates[DECODE] else 0
    decode_streak = history.decode_streak + 1 if decode_why and candidates[PREFILL] else 0
    flip_streak = history.flip_streak + 1 if flip_why and candidates[PREFILL] else 0
    kept = History(window, prefill_streak, decode_streak, history.last_switch, flip_streak)
    if now - history.last_switch < settings.cooldown_s:
        return None, kept
    if prefill_streak >= settings.hold_polls:
        engine, to_role, why = candidates[DECODE][0], PREFILL, prefill_why
    elif decode_streak >= settings.hold_polls:   # the stronger need first: decoders at their limit
        engine, to_role, why = candidates[PREFILL][0], DECODE, decode_why
    elif flip_streak >= settings.hold_polls:
        engine, to_role, why = candidates[PREFILL][0], BOTH, flip_why
    else:
        return None, kept
    reason = f"{why}, median of {len(window)} polls ({smooth.describe()})"
    return Switch(engine.instance_id, engine.role, to_role, reason), History(last_switch=now)


class Engines(Protocol):
    """What the planner reaches of the model version it plans for: the deployment gives it
    (repository/supervisor.py), a test gives fakes. A call on an engine that is gone raises."""

    what: str   # "model vN", for the log

    async def loads(self) -> list[EngineLoad]:
        """The version's engines on every node, as their records and a fresh Stats answer say."""

    def owns(self, instance_id: str) -> bool:
        """The engine is one of this node's AUTO engines, alive and not stopping."""

    async def drain(self, instance_id: str) -> None:
        """Sets the engine draining and waits until this node's routers see it so."""

    async def held(self, instance_id: str) -> int:
        """The requests the engine holds: running, waiting, awaiting KV or open in its RPC."""

    async def publish(self, instance_id: str, role: str) -> None:
        """Makes the engine ready in `role` (one record update) and waits until routers see it."""

    def count(self, switch: Switch, switched: bool) -> None:
        """A switch made (True) or abandoned (False), for pdserve_role_switches_total."""


class Planner:
    """Runs the decision for one deployment (model version) and carries out its switches."""

    def __init__(self, engines: Engines, settings: PlannerSettings):
        self.engines = engines
        self.settings = settings
        self.history = History()
        self._task: asyncio.Task | None = None

    @property
    def what(self) -> str:
        return self.engines.what

    def start(self) -> None:
        log.info("planner of %s: AUTO roles every %.1f s (%s)", self.what, self.settings.interval_s, self.settings)
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                loads = await self.engines.loads()
                switch, self.history = decide(loads, self.settings, self.history, time.monotonic())
                if log.isEnabledFor(logging.DEBUG) and loads:
                    log.debug("planner of %s: %s (streaks: prefill %d, decode %d, flip %d)", self.what,
                              measure(loads).describe(), self.history.prefill_streak, self.history.decode_streak,
                              self.history.flip_streak)
                if switch is not None:
                    await self.switch(switch)
                    self.history = replace(self.history, last_switch=time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("planner of %s: poll failed; going on", self.what)

    async def switch(self, switch: Switch) -> bool:
        """Drains the engine, waits until it is idle, and makes it ready in its new role; gives up
        after the drain timeout and makes it ready in its old role. True when it switched."""
        engines, instance_id = self.engines, switch.instance_id
        if not engines.owns(instance_id):
            return False
        log.info("planner of %s: switching %s from %s to %s: %s", self.what, instance_id, switch.from_role,
                 switch.to_role, switch.reason)
        started = time.monotonic()
        try:
            if switch.drains:
                await engines.drain(instance_id)
            if not switch.drains or await self._wait_idle(instance_id, self.settings.drain_timeout_s):
                await engines.publish(instance_id, switch.to_role)
                engines.count(switch, switched=True)
                log.info("planner of %s: %s is now %s (in %.1f s)", self.what, instance_id,
                         switch.to_role, time.monotonic() - started)
                return True
            log.warning("planner of %s: %s still had requests after %.0f s (planner_drain_timeout_s); switch to %s "
                        "abandoned, ready again as %s", self.what, instance_id, self.settings.drain_timeout_s,
                        switch.to_role, switch.from_role)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("planner of %s: switch of %s to %s failed (%s); making it ready as %s", self.what,
                        instance_id, switch.to_role, exc, switch.from_role)
        engines.count(switch, switched=False)
        try:
            if engines.owns(instance_id):
                await engines.publish(instance_id, switch.from_role)
        except Exception as exc:
            log.warning("planner of %s: could not make %s ready again (%s)", self.what, instance_id, exc)
        return False

    async def _wait_idle(self, instance_id: str, timeout: float) -> bool:
        """True once the engine holds no request at all: nothing running, waiting, awaiting KV,
        nor open in its RPC (a request accepted but not yet queued, a prefill call)."""
        end = time.monotonic() + timeout
        while True:
            if await self.engines.held(instance_id) == 0:
                return True
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(IDLE_POLL_S)

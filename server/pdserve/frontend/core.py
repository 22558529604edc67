"""The one request path every front door uses (KServe gRPC, KServe HTTP, OpenAI).

A door turns its protocol into a GenerationRequest and reads text pieces back; everything in
between lives here, once: the model lookup, the router's choice of engines (PD included), the
engine call and its cancellation, the in-flight count that a drain waits for, Triton's
statistics and the Prometheus metrics.

    dep = core.lookup(name, version)                  # ServeError: unknown model, not ready
    async with core.request(dep) as req:              # counted from here; outcome recorded at exit
        gen = parse(...)                              # InvalidInput is recorded as a failure
        async for piece in req.generate(gen):         # Piece per engine response
            ...                                       # time spent here counts as compute_output

Leaving the `async with` by an exception records a failure (its cause), by cancellation (a
client that went away) a cancelled request; an engine call still running is cancelled, which
frees the request's blocks in the engine.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from pdserve._proto import engine_pb2
from pdserve.cluster.engine_client import EngineCallError
from pdserve.cluster.model_files import ModelFiles
from pdserve.cluster.router import DEFAULT_MAX_LOCAL_PREFILL_TOKENS, Router
from pdserve.common.errors import Cause, ServeError
from pdserve.frontend.prompts import PromptTokenizers, PromptTokens
from pdserve.frontend.tensors import GenerationRequest
from pdserve.repository.manager import ModelRepositoryManager
from pdserve.repository.supervisor import Deployment

log = logging.getLogger(__name__)

MAX_ENGINE_ATTEMPTS = 3   # engines tried for a request that no engine could be reached for


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(ns, 0)


@dataclass
class VersionStats:
    """Triton's InferStatistics of one model version. Durations are disjoint parts of a
    successful request: compute_input (arrival to the engine call: validation, lookup, routing),
    queue (engine call to the first token: waiting in the engine and the prompt's prefill, which
    the engine does not report apart), compute_infer (first to last token, less the front end's
    own time) and compute_output (the front end turning pieces into responses and sending them)."""
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    last_inference_ms: int = 0


def engine_failure(exc: EngineCallError) -> EngineCallError:
    """Classifies a failed engine call; a passed deadline ends the request at once."""
    if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise ServeError(Cause.DEADLINE_EXCEEDED, "the request's deadline passed before it finished; "
                                                  "its engine work was stopped") from exc
    return exc


@dataclass
class Piece:
    """One engine response, protocol-neutral."""
    text: str
    finish_reason: str          # "" until the last piece
    num_input_tokens: int
    num_output_tokens: int      # so far
    new_tokens: int             # tokens in this piece
    token_ids: tuple[int, ...] = ()
    logprobs: tuple = ()        # engine_pb2.TokenLogprobs per token of token_ids, when asked
    prompt_logprobs: tuple = ()   # in the first piece, when asked: prompt tokens after the first
    prompt_token_ids: tuple[int, ...] = ()   # with prompt_logprobs


class Admission:
    """One engine request being admitted (taken by this front end, not yet sent to an engine:
    tokenizing, routing), counted with the others of its model version."""

    def __init__(self, counts: defaultdict, key: tuple[str, str]):
        self._counts, self._key, self._open = counts, key, True
        counts[key] += 1

    def close(self) -> int:
        """Ends this one's count (only the first call does); returns how many requests of its
        version are still being admitted. Sent with the engine request: an idle engine gathering
        a burst for its first step waits for them (engine/worker.py)."""
        if self._open:
            self._open = False
            self._counts[self._key] -= 1
        return self._counts[self._key]


class Request:
    """One request's accounting; made by InferenceCore.request()."""

    def __init__(self, core: "InferenceCore", dep: Deployment):
        self.core = core
        self.dep = dep
        self.key = (dep.name, str(dep.version))
        self.start = time.monotonic()
        self.engine_call = 0.0       # when the engine call went out
        self.first = None            # when the first piece came
        self.last = 0.0
        self.output_s = 0.0          # time the door spent between pieces
        self.n_in = self.n_out = 0
        # (prompt text, add special tokens) -> its tokenization: the sibling sequences of n/best_of share one
        self._prompts: dict[tuple[str, bool], asyncio.Future] = {}
        self._admissions: list[Admission] = []   # one per engine call; closed when sent, or at the end

    async def _tokenized(self, prompt: str, add_special_tokens: bool) -> PromptTokens:
        key = (prompt, add_special_tokens)
        future = self._prompts.get(key)
        if future is None:
            future = self._prompts[key] = asyncio.ensure_future(self.core.tokenize(self.dep, prompt,
                                                                                   add_special_tokens))
        return await asyncio.shield(future)

    async def generate(self, gen: GenerationRequest, deadline: float | None = None) -> AsyncIterator[Piece]:
        """Routes to a decode engine (with a prefill engine in PD) and yields its pieces.

        An engine that cannot be reached before it sent anything (a dead node whose record still
        lives, a crash at admission) is marked suspect and the request goes to another one. An
        engine that dies mid-stream is replaced up to the model's migration_limit times: the next
        engine continues from the prompt plus the tokens already sent, so the client sees no error.
        `deadline` (time.monotonic()) bounds the engine call: DEADLINE_EXCEEDED after it."""
        core, dep = self.core, self.dep
        admission = Admission(core.admitting, self.key)
        self._admissions.append(admission)
        failed: set[str] = set()
        sent_tokens: list[int] = []
        n_out = 0   # this call's tokens: a request may make several calls (n choices), counted together
        migrations = 0
        migration_limit = dep.spec.engine_parameters.get("migration_limit", 0)
        max_local_prefill = dep.spec.engine_parameters.get("max_local_prefill_tokens", DEFAULT_MAX_LOCAL_PREFILL_TOKENS)
        stream_interval = max(dep.spec.engine_parameters.get("stream_interval", 1), gen.sampling.stream_interval)
        prompt = await self._tokenized(gen.prompt, gen.add_special_tokens)
        sampling = gen.sampling
        if sampling.bad_words:   # the engine bans token ids
            ids = await core.tokenizers.bad_words(await core.model_folder(dep), sampling.bad_words)
            sampling = dataclasses.replace(sampling, bad_words_token_ids=ids)
        request = engine_pb2.GenerateRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt.token_ids,
                                             prompt_block_hashes=prompt.block_hashes, block_size=prompt.block_size,
                                             sampling=sampling.to_proto())
        prompt_tokens = len(prompt.token_ids)
        prompt_hashes = prompt.block_hashes if core.router.uses_prefix else []
        if gen.sampling.prefilled_where_decoded:   # no handoff: load and metrics count it where it runs
            max_local_prefill = prompt_tokens
        while True:
            try:
                route = core.router.choose(dep.name, str(dep.version), frozenset(failed),
                                           prompt_tokens=prompt_tokens, prompt_hashes=prompt_hashes,
                                           max_local_prefill_tokens=max_local_prefill)
            except ServeError:
                if failed:   # every engine failed this request: say so, not "no engine"
                    raise ServeError(Cause.ENGINE_FAILURE, f"engines {sorted(failed)} could not be reached; "
                                                           "retry the request") from None
                raise
            with core.router.track(route), dep.serving_request():
                # a migrated request recomputes its KV where it continues, not on a prefill engine
                request.prefill_address = route.prefill.address if route.prefill and not sent_tokens else ""
                if core.metrics:
                    core.metrics.prefill_routed(self.key, remote=bool(request.prefill_address))
                client = route.client
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                self.engine_call = self.engine_call or time.monotonic()
                # the others still admitting, spread over the version's engines: about how
                # many more of this burst the chosen one will get
                request.admitting = admission.close() // max(core.router.decode_engines(dep.name, str(dep.version)), 1)
                call = client.generate(request, timeout=timeout, stream_interval=stream_interval)
                started = finished = False
                try:
                    async for response in call:
                        now = time.monotonic()
                        started = True
                        if self.first is None:
                            self.first = now
                        finished = bool(response.finish_reason)
                        sent_tokens += response.token_ids
                        delta = response.num_output_tokens - n_out
                        n_out = response.num_output_tokens
                        self.n_in, self.n_out = response.num_input_tokens, self.n_out + delta
                        yield Piece(response.text, response.finish_reason, self.n_in, n_out, delta,
                                    tuple(response.token_ids), tuple(response.logprobs),
                                    tuple(response.prompt_logprobs),
                                    tuple(prompt.token_ids) if response.prompt_logprobs else ())
                        self.last = time.monotonic()
                        self.output_s += self.last - now
                    return
                except EngineCallError as exc:
                    failure = engine_failure(exc)
                finally:
                    if not finished:
                        call.cancel()
            if failure.engine_lost:
                client.suspect = True
                if not started and len(failed) < MAX_ENGINE_ATTEMPTS - 1:
                    log.warning("engine %s unreachable (%s); retrying on another engine",
                                route.decode.instance_id, failure.details)
                    failed.add(route.decode.instance_id)
                    request.request_id = uuid.uuid4().hex
                    continue
            cause = failure.cause or Cause.ENGINE_FAILURE
            if started and cause == Cause.ENGINE_FAILURE and migrations < migration_limit:
                migrations += 1
                log.warning("engine %s failed mid-stream (%s); migrating the request with its %d tokens "
                            "(migration %d of %d)", route.decode.instance_id, failure.details, len(sent_tokens),
                            migrations, migration_limit)
                if core.metrics:
                    core.metrics.migrated(self.key)
                failed.add(route.decode.instance_id)
                request.request_id = uuid.uuid4().hex
                request.resume_token_ids[:] = sent_tokens
                continue
            if cause == Cause.INVALID_ARGUMENT:
                raise ServeError(cause, failure.details)
            raise ServeError(cause, f"engine {route.decode.instance_id} could not finish the request "
                                    f"({failure.code.name}: {failure.details}); retry the request")

    def _finish(self, failure: Cause | None) -> None:
        for admission in self._admissions:   # a call that failed before reaching an engine
            admission.close()
        now = time.monotonic()
        s = self.core.stats[self.key]
        elapsed_ns = int((now - self.start) * 1e9)
        if failure is None:
            s.success.add(elapsed_ns)
            s.last_inference_ms = int(time.time() * 1000)
            if self.first is not None:
                s.compute_input.add(int((self.engine_call - self.start) * 1e9))
                s.queue.add(int((self.first - self.engine_call) * 1e9))
                s.compute_infer.add(int((max(self.last, self.first) - self.first - self.output_s) * 1e9))
                s.compute_output.add(int((self.output_s + now - max(self.last, self.first)) * 1e9))
        else:
            s.fail.add(elapsed_ns)
        if self.core.metrics:
            self.core.metrics.request_finished(self.key, failure, self.start, self.first, self.n_in, self.n_out)


class _RequestScope:
    def __init__(self, request: Request):
        self.request = request

    async def __aenter__(self) -> Request:
        if self.request.core.metrics:
            self.request.core.metrics.request_started(self.request.key)
        return self.request

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            failure = None
        elif isinstance(exc, ServeError):
            failure = exc.cause
        elif isinstance(exc, ConnectionResetError):   # a stream's write to a client that went away
            failure = Cause.CANCELLED
        elif isinstance(exc, Exception):   # a bug must still end the request with a status, never hang
            log.error("request to %s failed unexpectedly", self.request.key, exc_info=exc)
            self.request._finish(Cause.INTERNAL)
            raise ServeError(Cause.INTERNAL, f"internal error: {type(exc).__name__}: {exc}") from exc
        else:  # the client went away (cancellation, a closed connection)
            failure = Cause.CANCELLED
        self.request._finish(failure)
        return False


class InferenceCore:
    def __init__(self, manager: ModelRepositoryManager, router: Router, metrics=None,
                 tokenizers: PromptTokenizers | None = None, model_files: ModelFiles | None = None):
        self.manager = manager
        self.router = router
        self.metrics = metrics
        self.tokenizers = tokenizers or PromptTokenizers()
        self.model_files = model_files   # tokenizer files of models other nodes load (router-only nodes)
        self.stats: dict[tuple[str, str], VersionStats] = defaultdict(VersionStats)
        self.admitting: defaultdict[tuple[str, str], int] = defaultdict(int)   # Admission counts per version

    def lookup(self, name: str, version: str = "") -> Deployment:
        """The deployment serving this model version; ServeError when unknown or not ready.
        Unknown models count nowhere (no metric series for names clients make up)."""
        return self.manager.get(name, version)

    def request(self, dep: Deployment) -> _RequestScope:
        return _RequestScope(Request(self, dep))

    async def tokenize(self, dep: Deployment, prompt: str, add_special_tokens: bool = True) -> PromptTokens:
        """The prompt's token ids and block hashes (at the engines' block size), tokenized off the
        event loop (frontend/prompts.py); ServeError when it is empty or too long for the engines."""
        name, version = dep.name, str(dep.version)
        return await self.tokenizers.encode(await self.model_folder(dep), prompt,
                                            self.router.max_model_len(name, version) or 0,
                                            self.router.block_size(name, version) or 0, add_special_tokens)

    def max_model_len(self, dep: Deployment) -> int | None:
        """The longest sequence the version's ready engines take (None: no engine says)."""
        return self.router.max_model_len(dep.name, str(dep.version))

    async def model_folder(self, dep: Deployment) -> str:
        """The folder with the version's tokenizer files: its version folder in this node's
        repository, or, for a model only other nodes load, the files they published in etcd."""
        record = self.manager.remote_record(dep)
        if record is None or self.model_files is None:
            return os.path.join(dep.spec.path, str(dep.version))
        return await self.model_files.folder(record)

"""The KServe v2 GRPCInferenceService (Triton's wire protocol): the protocol and nothing else.

Model lookup and in-flight counting belong to the repository manager, engine choice to the
router; every failure arrives as a ServeError whose cause decides the status (common/errors.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import grpc

from pdserve import __version__
from pdserve._proto import engine_pb2, grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
from pdserve.cluster.router import Router
from pdserve.common.errors import Cause, ServeError, cause_of
from pdserve.frontend.responses import build_response
from pdserve.frontend.tensors import GenerationRequest, parse_request
from pdserve.repository.config import KSERVE_DATATYPES, ConfigError
from pdserve.repository.manager import ModelRepositoryManager, ModelState
from pdserve.repository.supervisor import Deployment, EngineStartError

log = logging.getLogger(__name__)

MAX_ENGINE_ATTEMPTS = 3   # engines tried for a request that no engine could be reached for

EXTENSIONS = ["model_repository", "model_configuration", "statistics", "binary_tensor_data", "parameters"]


@dataclass
class VersionStats:
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    last_inference_ms: int = 0


def _bool_param(value: bool) -> pb.InferParameter:
    return pb.InferParameter(bool_param=value)


@dataclass(frozen=True)
class EngineFailure:
    """How an engine call ended badly."""
    code: grpc.StatusCode
    details: str
    cause: Cause | None       # what the engine said; None: it never answered (unreachable, died)

    @property
    def engine_lost(self) -> bool:
        """Unreachable, died, or shutting down (an engine cancels its calls when it stops)."""
        return self.cause is None and self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def engine_failure(exc: grpc.aio.AioRpcError) -> EngineFailure:
    """Classifies a failed engine call; a passed deadline ends the request at once."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise ServeError(Cause.DEADLINE_EXCEEDED, "the request's deadline passed before it finished; "
                                                  "its engine work was stopped") from exc
    return EngineFailure(exc.code(), exc.details() or "", cause_of(exc, None))


def request_deadline(request: pb.ModelInferRequest, rpc_remaining: float | None) -> float | None:
    """time.monotonic() by which the request must end: the RPC's deadline, or Triton's `timeout`
    request parameter (microseconds), whichever comes first; None: no deadline."""
    limits = [rpc_remaining] if rpc_remaining is not None else []
    if "timeout" in request.parameters:
        param = request.parameters["timeout"]
        micros = getattr(param, param.WhichOneof("parameter_choice") or "int64_param")
        if isinstance(micros, bool) or not isinstance(micros, int) or micros <= 0:
            raise ServeError(Cause.INVALID_ARGUMENT, f"parameter 'timeout' is {micros!r}; send the request's "
                                                     "timeout in microseconds as a positive integer")
        limits.append(micros / 1e6)
    return time.monotonic() + min(limits) if limits else None


async def _abort(context, error: ServeError) -> None:
    await context.abort(error.cause.status, error.message)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, manager: ModelRepositoryManager, router: Router, metrics=None):
        self.manager = manager
        self.router = router
        self.clients = router.clients
        self.metrics = metrics
        self.started = False
        self.stats: dict[tuple[str, str], VersionStats] = defaultdict(VersionStats)

    async def _call(self, context, fn):
        try:
            return fn()
        except ServeError as exc:
            await _abort(context, exc)

    # ---- health and metadata -------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.started and self.manager.all_ready())

    async def ModelReady(self, request, context):
        try:
            self.manager.get(request.name, request.version)
            return pb.ModelReadyResponse(ready=True)
        except ServeError:
            return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="pdserve", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        def build():
            config = self.manager.get(request.name, request.version).spec.config
            return pb.ModelMetadataResponse(
                name=request.name, versions=[str(v) for v in self.manager.ready_versions(request.name)],
                platform="pdserve",
                inputs=[pb.ModelMetadataResponse.TensorMetadata(name=i.name, datatype=KSERVE_DATATYPES[i.data_type], shape=list(i.dims))
                        for i in config.input],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(name=o.name, datatype=KSERVE_DATATYPES[o.data_type], shape=list(o.dims))
                         for o in config.output])
        return await self._call(context, build)

    async def ModelConfig(self, request, context):
        return await self._call(context, lambda: pb.ModelConfigResponse(
            config=self.manager.get(request.name, request.version).spec.config))

    async def ModelStatistics(self, request, context):
        def build():
            if request.name:
                dep = self.manager.get(request.name, request.version)
                keys = [(dep.name, str(dep.version))]
            else:
                keys = [(name, status.version) for name, status in self.manager.index()
                        if status.state == ModelState.READY]
            out = pb.ModelStatisticsResponse()
            for name, version in keys:
                s = self.stats[(name, version)]
                out.model_stats.add(
                    name=name, version=version, last_inference=s.last_inference_ms,
                    inference_count=s.success_count, execution_count=s.success_count,
                    inference_stats=pb.InferStatistics(
                        success=pb.StatisticDuration(count=s.success_count, ns=s.success_ns),
                        fail=pb.StatisticDuration(count=s.fail_count, ns=s.fail_ns),
                        queue=pb.StatisticDuration(count=s.queue_count, ns=s.queue_ns)))
            return out
        return await self._call(context, build)

    # ---- repository ------------------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        out = pb.RepositoryIndexResponse()
        for name, status in self.manager.index():
            if request.ready and status.state != ModelState.READY:
                continue
            out.models.add(name=name, version=status.version, state=status.state.value, reason=status.reason)
        return out

    def _check_repository_call(self, name: str, what: str) -> None:
        if self.manager.mode != "explicit":
            raise ServeError(Cause.CONTROL_MODE,
                             f"explicit model {what} is not allowed in model control mode '{self.manager.mode}'; "
                             "start pdserve with --model-control-mode explicit")
        if not name:
            raise ServeError(Cause.INVALID_ARGUMENT, f"model_name is empty; name the model to {what}")

    async def RepositoryModelLoad(self, request, context):
        try:
            self._check_repository_call(request.model_name, "load")
            if not self.manager.knows(request.model_name):
                raise ServeError(Cause.MODEL_LOAD_FAILED,
                                 f"failed to load '{request.model_name}': no such folder in the model repository "
                                 f"{self.manager.repository}")
            try:
                await self.manager.load(request.model_name)
            except (ConfigError, EngineStartError) as exc:
                raise ServeError(Cause.MODEL_LOAD_FAILED, f"failed to load '{request.model_name}': {exc}") from exc
        except ServeError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._call(context, lambda: self._check_repository_call(request.model_name, "unload"))
        await self.manager.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- inference ---------------------------------------------------------------------------------
    async def _generate(self, gen: GenerationRequest, dep: Deployment, timing: dict, deadline: float | None):
        """Routes to a decode engine (with a prefill engine in PD) and yields its GenerateResponses.

        An engine that cannot be reached before it sent anything (a dead node whose record still
        lives, a crash at admission) is marked suspect and the request goes to another one. An
        engine that dies mid-stream is replaced up to the model's migration_limit times: the next
        engine continues from the prompt plus the tokens already sent, so the client sees no error."""
        failed: set[str] = set()
        sent_tokens: list[int] = []
        migrations = 0
        migration_limit = dep.spec.engine_parameters.get("migration_limit", 0)
        request = engine_pb2.GenerateRequest(request_id=uuid.uuid4().hex, prompt=gen.prompt,
                                             sampling=gen.sampling.to_proto())
        while True:
            try:
                route = self.router.choose(dep.name, str(dep.version), frozenset(failed))
            except ServeError:
                if failed:   # every engine failed this request: say so, not "no engine"
                    raise ServeError(Cause.ENGINE_FAILURE, f"engines {sorted(failed)} could not be reached; "
                                                           "retry the request") from None
                raise
            with self.router.track(route), dep.serving_request():
                # a migrated request recomputes its KV where it continues, not on a prefill engine
                request.prefill_address = route.prefill.address if route.prefill and not sent_tokens else ""
                client = self.clients.get(route.decode.address)
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                call = client.generate(request, timeout=timeout)
                started = finished = False
                try:
                    async for response in call:
                        started = True
                        if "first" not in timing:
                            timing["first"] = time.monotonic()
                        finished = bool(response.finish_reason)
                        sent_tokens += response.token_ids
                        yield response
                    return
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise       # the client went away
                    # the call was cancelled under us: its engine died and its channel was closed
                    failure = EngineFailure(grpc.StatusCode.UNAVAILABLE, "the engine went away", None)
                except grpc.aio.AioRpcError as exc:
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
                if self.metrics:
                    self.metrics.migrated((dep.name, str(dep.version)))
                failed.add(route.decode.instance_id)
                request.request_id = uuid.uuid4().hex
                request.resume_token_ids[:] = sent_tokens
                continue
            if cause == Cause.INVALID_ARGUMENT:
                raise ServeError(cause, failure.details)
            raise ServeError(cause, f"engine {route.decode.instance_id} could not finish the request "
                                    f"({failure.code.name}: {failure.details}); retry the request")

    async def _run_request(self, request: pb.ModelInferRequest, streaming_rpc: bool, rpc_remaining: float | None):
        """Validates, routes and runs one request; yields (ModelInferResponse, is_last).

        Streaming yields one response per text piece; otherwise one response with the whole text.
        The request ends by the earlier of the RPC's deadline and its `timeout` parameter.
        """
        dep = self.manager.get(request.model_name, request.model_version)  # unknown models count nowhere
        key = (dep.name, str(dep.version))
        start, timing = time.monotonic(), {}
        n_in = n_out = 0
        outcome = Cause.CANCELLED
        if self.metrics:
            self.metrics.request_started(key)
        try:
            deadline = request_deadline(request, rpc_remaining)
            gen = parse_request(request)
            stream = streaming_rpc and gen.stream
            prefix = gen.prompt if (not stream and gen.exclude_input_in_output is not True) else ""
            pieces, reason = [prefix], ""
            async for r in self._generate(gen, dep, timing, deadline):
                n_in, reason = r.num_input_tokens, r.finish_reason
                delta = r.num_output_tokens - n_out
                n_out = r.num_output_tokens
                if not stream:
                    pieces.append(r.text)
                elif r.text or reason or gen.wants("num_output_tokens"):
                    yield build_response(request, gen, r.text, reason, n_in, delta), bool(reason)
            if not stream:
                yield build_response(request, gen, "".join(pieces), reason, n_in, n_out), True
            outcome = None
        except ServeError as exc:
            outcome = exc.cause
            raise
        except Exception as exc:  # a bug must still end the request with a status, never hang or vanish
            log.exception("request to %s failed unexpectedly", key)
            outcome = Cause.INTERNAL
            raise ServeError(Cause.INTERNAL, f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            self._record(key, start, timing, n_in, n_out, outcome)

    def _record(self, key, start: float, timing: dict, n_in: int, n_out: int, failure: Cause | None) -> None:
        elapsed_ns = int((time.monotonic() - start) * 1e9)
        s = self.stats[key]
        if failure is None:
            s.success_count += 1
            s.success_ns += elapsed_ns
            s.last_inference_ms = int(time.time() * 1000)
            if "first" in timing:
                s.queue_count += 1
                s.queue_ns += int((timing["first"] - start) * 1e9)
        else:
            s.fail_count += 1
            s.fail_ns += elapsed_ns
        if self.metrics:
            self.metrics.request_finished(key, failure, start, timing.get("first"), n_in, n_out)

    async def ModelInfer(self, request, context):
        try:
            responses = [r async for r, _ in self._run_request(request, False, context.time_remaining())]
            return responses[-1]
        except ServeError as exc:
            await _abort(context, exc)

    async def ModelStreamInfer(self, request_iterator, context):
        """Decoupled streaming: requests run concurrently; each ends with triton_final_response."""
        close_on_error = any(k == "triton_grpc_error" and v.lower() == "true"
                             for k, v in context.invocation_metadata() or ())
        outbox: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def serve_one(request: pb.ModelInferRequest):
            empty_final = request.parameters["triton_enable_empty_final_response"].bool_param \
                if "triton_enable_empty_final_response" in request.parameters else False
            try:
                async for response, last in self._run_request(request, True, context.time_remaining()):
                    response.parameters["triton_final_response"].CopyFrom(_bool_param(last and not empty_final))
                    await outbox.put(pb.ModelStreamInferResponse(infer_response=response))
                if empty_final:
                    final = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                                  id=request.id)
                    final.parameters["triton_final_response"].CopyFrom(_bool_param(True))
                    await outbox.put(pb.ModelStreamInferResponse(infer_response=final))
            except ServeError as exc:
                await outbox.put(exc)
            except Exception as exc:  # never leave a request of the stream without an answer
                log.exception("stream request failed unexpectedly")
                await outbox.put(ServeError(Cause.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"))

        async def read_requests():
            async for request in request_iterator:
                task = asyncio.ensure_future(serve_one(request))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), outbox.put_nowait(None)))
            await outbox.put(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while True:
                item = await outbox.get()
                if item is None:
                    if reader.done() and not tasks:
                        break
                    continue
                if isinstance(item, ServeError):
                    if close_on_error:
                        await _abort(context, item)
                    yield pb.ModelStreamInferResponse(error_message=item.message)
                    continue
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

"""The KServe v2 GRPCInferenceService (Triton's wire protocol) over the repository manager."""
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
from pdserve._proto import model_config_pb2 as mc
from pdserve.frontend.responses import build_response
from pdserve.frontend.tensors import GenerationRequest, InvalidInput, parse_request
from pdserve.repository.config import ConfigError
from pdserve.repository.manager import LOADING, READY, ModelRepositoryManager
from pdserve.cluster.router import NoEngineAvailable, Router
from pdserve.repository.supervisor import Deployment, EngineStartError

log = logging.getLogger(__name__)

EXTENSIONS = ["model_repository", "model_configuration", "statistics", "binary_tensor_data", "parameters"]
DATATYPES = {mc.TYPE_STRING: "BYTES", mc.TYPE_BOOL: "BOOL", mc.TYPE_UINT32: "UINT32"}


class RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or code.name.lower()


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


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, manager: ModelRepositoryManager, router: Router, metrics=None):
        self.manager = manager
        self.router = router
        self.clients = router.clients
        self.metrics = metrics
        self.started = False
        self.stats: dict[tuple[str, str], VersionStats] = defaultdict(VersionStats)

    # ---- resolving a model name and version ------------------------------------------------
    def resolve(self, name: str, version: str) -> Deployment:
        if not name:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "model_name is empty; name the model to call")
        entry = self.manager.entry(name)
        if entry is None and not self.manager.knows(name):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Request for unknown model: '{name}' is not found")
        serving = entry.serving if entry else {}
        if version:
            if not version.isdigit():
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"model_version '{version}' is not a version number; send digits or leave it empty")
            v = int(version)
            if v in serving:
                return serving[v]
            if entry and (v in entry.loading or v in entry.unloading):
                state = LOADING if v in entry.loading else "UNLOADING"
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE,
                                    f"Request for model '{name}' version {v}: the version is not ready ({state}); retry shortly")
            available = ", ".join(str(x) for x in sorted(serving)) or "none"
            raise RequestFailed(grpc.StatusCode.NOT_FOUND,
                                f"Request for unknown model: '{name}' version {v} is not found; ready versions: {available}")
        if not serving:
            why = f": {entry.reason}" if entry and entry.reason else ""
            state = " (loading)" if entry and entry.loading else ""
            raise RequestFailed(grpc.StatusCode.NOT_FOUND,
                                f"Request for unknown model: '{name}' has no available versions{state}{why}")
        return serving[max(serving)]

    # ---- health and metadata -------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        rows = self.manager.index()
        ready = self.started and all(s.state == READY or s.reason == "unloaded" for _, s in rows)
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request, context):
        try:
            self.resolve(request.name, request.version)
            return pb.ModelReadyResponse(ready=True)
        except RequestFailed:
            return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="pdserve", version=__version__, extensions=EXTENSIONS)

    async def _call(self, context, fn):
        try:
            return fn()
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)

    async def ModelMetadata(self, request, context):
        def build():
            dep = self.resolve(request.name, request.version)
            config = dep.spec.config
            entry = self.manager.entry(request.name)
            return pb.ModelMetadataResponse(
                name=request.name, versions=[str(v) for v in sorted(entry.serving)], platform="pdserve",
                inputs=[pb.ModelMetadataResponse.TensorMetadata(name=i.name, datatype=DATATYPES[i.data_type], shape=list(i.dims))
                        for i in config.input],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(name=o.name, datatype=DATATYPES[o.data_type], shape=list(o.dims))
                         for o in config.output])
        return await self._call(context, build)

    async def ModelConfig(self, request, context):
        return await self._call(context, lambda: pb.ModelConfigResponse(
            config=self.resolve(request.name, request.version).spec.config))

    async def ModelStatistics(self, request, context):
        def build():
            if request.name:
                dep = self.resolve(request.name, request.version)
                keys = [(dep.name, str(dep.version))]
            else:
                keys = [(name, status.version) for name, status in self.manager.index() if status.state == READY]
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
            if request.ready and status.state != READY:
                continue
            out.models.add(name=name, version=status.version, state=status.state, reason=status.reason)
        return out

    async def _explicit_only(self, context, what: str):
        if self.manager.mode != "explicit":
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"explicit model {what} is not allowed in model control mode '{self.manager.mode}'; "
                                "start pdserve with --model-control-mode explicit")

    async def RepositoryModelLoad(self, request, context):
        await self._explicit_only(context, "load")
        if not request.model_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model_name is empty; name the model folder to load")
        if not self.manager.knows(request.model_name):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"failed to load '{request.model_name}': no such folder in the model repository "
                                f"{self.manager.repository}")
        try:
            await self.manager.load(request.model_name)
        except (ConfigError, EngineStartError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{request.model_name}': {exc}")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._explicit_only(context, "unload")
        if not request.model_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model_name is empty; name the model to unload")
        await self.manager.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- inference ---------------------------------------------------------------------------------
    async def _generate(self, request: pb.ModelInferRequest, gen: GenerationRequest, dep: Deployment, timing: dict):
        """Routes to a decode engine (with a prefill engine in PD) and yields its GenerateResponses."""
        try:
            decode, prefill = self.router.choose(dep.name, str(dep.version))
        except NoEngineAvailable as exc:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, str(exc), "no_engine") from exc
        chosen = [decode.instance_id] + ([prefill.instance_id] if prefill else [])
        dep.inflight += 1
        for instance_id in chosen:
            self.router.inflight[instance_id] += 1
        call = self.clients.get(decode.address).generate(engine_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, prompt=gen.prompt, sampling=gen.sampling,
            prefill_address=prefill.address if prefill else "", prefill_instance_id=prefill.instance_id if prefill else ""))
        finished = False
        try:
            async for response in call:
                if "first" not in timing:
                    timing["first"] = time.monotonic()
                finished = bool(response.finish_reason)
                yield response
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, exc.details()) from exc
            if exc.code() == grpc.StatusCode.CANCELLED:
                raise
            handoff = "KV handoff failed" in (exc.details() or "")
            if handoff and self.metrics:
                self.metrics.handoff_failed((dep.name, str(dep.version)), exc.details())
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE,
                                f"engine {decode.instance_id} could not finish the request ({exc.code().name}: "
                                f"{exc.details()}); retry the request", "kv_handoff" if handoff else "engine_failure") from exc
        finally:
            dep.inflight -= 1
            for instance_id in chosen:
                self.router.inflight[instance_id] -= 1
            if not finished:
                call.cancel()

    async def _run_request(self, request: pb.ModelInferRequest, streaming_rpc: bool):
        """Validates, routes and runs one request; yields (ModelInferResponse, is_last).

        Streaming yields one response per text piece; otherwise one response with the whole text.
        """
        dep = self.resolve(request.model_name, request.model_version)  # unknown models count nowhere
        key = (dep.name, str(dep.version))
        start, timing = time.monotonic(), {}
        n_in = n_out = 0
        outcome = "cancelled"
        if self.metrics:
            self.metrics.request_started(key)
        try:
            try:
                gen = parse_request(request)
            except InvalidInput as exc:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            stream = streaming_rpc and gen.stream
            prefix = gen.prompt if (not stream and gen.exclude_input_in_output is not True) else ""
            pieces, reason = [prefix], ""
            async for r in self._generate(request, gen, dep, timing):
                n_in, reason = r.num_input_tokens, r.finish_reason
                delta = r.num_output_tokens - n_out
                n_out = r.num_output_tokens
                if not stream:
                    pieces.append(r.text)
                elif r.text or reason or gen.wants("num_output_tokens"):
                    yield build_response(request, gen, r.text, reason, n_in, delta), bool(reason)
            if not stream:
                yield build_response(request, gen, "".join(pieces), reason, n_in, n_out), True
            outcome = ""
        except RequestFailed as exc:
            outcome = exc.reason
            raise
        finally:
            self._record(key, start, timing, n_in, n_out, outcome)

    def _record(self, key, start: float, timing: dict, n_in: int, n_out: int, failure: str) -> None:
        elapsed_ns = int((time.monotonic() - start) * 1e9)
        s = self.stats[key]
        if not failure:
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
            self.metrics.request_finished(key, not failure, failure, start, timing.get("first"), n_in, n_out)

    async def ModelInfer(self, request, context):
        try:
            responses = [r async for r, _ in self._run_request(request, streaming_rpc=False)]
            return responses[-1]
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)

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
                async for response, last in self._run_request(request, streaming_rpc=True):
                    response.parameters["triton_final_response"].CopyFrom(_bool_param(last and not empty_final))
                    await outbox.put(pb.ModelStreamInferResponse(infer_response=response))
                if empty_final:
                    final = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                                  id=request.id)
                    final.parameters["triton_final_response"].CopyFrom(_bool_param(True))
                    await outbox.put(pb.ModelStreamInferResponse(infer_response=final))
            except RequestFailed as exc:
                await outbox.put(exc)

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
                if isinstance(item, RequestFailed):
                    if close_on_error:
                        await context.abort(item.code, item.message)
                    yield pb.ModelStreamInferResponse(error_message=item.message)
                    continue
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

"""The KServe v2 GRPCInferenceService (Triton's wire protocol): the protocol and nothing else.

Model lookup and in-flight counting belong to the repository manager, engine choice to the
router; every failure arrives as a ServeError whose cause decides the status (common/errors.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import struct
import time
from dataclasses import dataclass

from pdserve import __version__
from pdserve._proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
from pdserve.cluster.router import Router
from pdserve.common.errors import Cause, ServeError
from pdserve.frontend.choices import Choice, best, gather
from pdserve.frontend.core import InferenceCore
from pdserve.frontend.logprobs import Scored, TokenTexts, kserve_logprobs
from pdserve.frontend.protocol import InvalidInput, sibling_params
from pdserve.frontend.settings import Settings
from pdserve.frontend.tensors import GenerationRequest, parse_request, serialize_bytes
from pdserve.repository.config import KSERVE_DATATYPES, ConfigError
from pdserve.repository.manager import ModelRepositoryManager, ModelState
from pdserve.repository.supervisor import EngineStartError

log = logging.getLogger(__name__)

EXTENSIONS = ["model_repository", "model_configuration", "statistics", "binary_tensor_data", "parameters",
              "trace", "logging", "generate"]


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


@dataclass(frozen=True)
class Sequence:
    """One sequence's part of a response (n > 1: one per sequence)."""
    text: str
    finish_reason: str
    num_output_tokens: int
    logprobs: str = ""    # the `logprobs` output's JSON (frontend/logprobs.py)


def build_response(request: pb.ModelInferRequest, gen: GenerationRequest, num_input_tokens: int,
                   sequences: list[Sequence]) -> pb.ModelInferResponse:
    """A ModelInferResponse with its outputs as raw contents, as Triton sends them."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                     id=request.id)

    def add(name: str, datatype: str, raw: bytes, count: int = len(sequences)) -> None:
        response.outputs.add(name=name, datatype=datatype, shape=[count])
        response.raw_output_contents.append(raw)
    if gen.wants("text_output"):
        add("text_output", "BYTES", serialize_bytes([s.text.encode("utf-8") for s in sequences]))
    if gen.wants("finish_reason") and all(s.finish_reason for s in sequences):
        add("finish_reason", "BYTES", serialize_bytes([s.finish_reason.encode("utf-8") for s in sequences]))
    if gen.wants("num_input_tokens"):
        add("num_input_tokens", "UINT32", struct.pack("<I", num_input_tokens), 1)
    if gen.wants("num_output_tokens"):
        add("num_output_tokens", "UINT32", b"".join(struct.pack("<I", s.num_output_tokens) for s in sequences))
    if gen.wants("logprobs"):
        add("logprobs", "BYTES", serialize_bytes([s.logprobs.encode("utf-8") for s in sequences]))
    return response


def _bool_param(value: bool) -> pb.InferParameter:
    return pb.InferParameter(bool_param=value)


async def _abort(context, error: ServeError) -> None:
    await context.abort(error.cause.status, error.message)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The gRPC door. Its answers (metadata, config, statistics, repository) are built by plain
    methods that raise ServeError, which the HTTP door calls too; inference goes through the
    shared InferenceCore."""

    def __init__(self, manager: ModelRepositoryManager, router: Router, metrics=None, core: InferenceCore | None = None,
                 settings: Settings | None = None):
        self.manager = manager
        self.core = core or InferenceCore(manager, router, metrics)   # the router and metrics live there
        self.settings = settings or Settings(manager)   # trace and log settings, shared with the HTTP door
        self.started = False

    @property
    def stats(self):
        return self.core.stats

    async def _call(self, context, fn):
        try:
            return fn()
        except ServeError as exc:
            await _abort(context, exc)

    # ---- answers shared by the gRPC and HTTP doors (raise ServeError) ------------------------------
    def server_ready(self) -> bool:
        return self.started and self.manager.all_ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.manager.get(name, version)
            return True
        except ServeError:
            return False

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="pdserve", version=__version__, extensions=EXTENSIONS)

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        config = self.manager.get(name, version).spec.config
        return pb.ModelMetadataResponse(
            name=name, versions=[str(v) for v in self.manager.ready_versions(name)],
            platform="pdserve",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=i.name, datatype=KSERVE_DATATYPES[i.data_type], shape=list(i.dims))
                    for i in config.input],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=o.name, datatype=KSERVE_DATATYPES[o.data_type], shape=list(o.dims))
                     for o in config.output])

    def model_config(self, name: str, version: str = "") -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.manager.get(name, version).spec.config)

    def model_statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        if name:
            dep = self.manager.get(name, version)
            keys = [(dep.name, str(dep.version))]
        else:
            keys = [(n, status.version) for n, status in self.manager.index() if status.state == ModelState.READY]
        out = pb.ModelStatisticsResponse()
        for n, v in keys:
            s = self.stats[(n, v)]
            duration = lambda d: pb.StatisticDuration(count=d.count, ns=d.ns)  # noqa: E731
            out.model_stats.add(
                name=n, version=v, last_inference=s.last_inference_ms,
                inference_count=s.success.count, execution_count=s.success.count,
                inference_stats=pb.InferStatistics(
                    success=duration(s.success), fail=duration(s.fail), queue=duration(s.queue),
                    compute_input=duration(s.compute_input), compute_infer=duration(s.compute_infer),
                    compute_output=duration(s.compute_output)))
        return out

    def repository_index(self, ready: bool = False) -> pb.RepositoryIndexResponse:
        out = pb.RepositoryIndexResponse()
        for name, status in self.manager.index():
            if ready and status.state != ModelState.READY:
                continue
            out.models.add(name=name, version=status.version, state=status.state.value, reason=status.reason)
        return out

    async def repository_load(self, name: str) -> None:
        self._check_repository_call(name, "load")
        if not self.manager.local(name):
            raise ServeError(Cause.MODEL_LOAD_FAILED,
                             f"failed to load '{name}': no such folder in the model repository {self.manager.repository}")
        try:
            await self.manager.load(name)
        except (ConfigError, EngineStartError) as exc:
            raise ServeError(Cause.MODEL_LOAD_FAILED, f"failed to load '{name}': {exc}") from exc

    async def repository_unload(self, name: str) -> None:
        self._check_repository_call(name, "unload")
        await self.manager.unload(name)

    # ---- health and metadata -------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.server_ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return self.server_metadata()

    async def ModelMetadata(self, request, context):
        return await self._call(context, lambda: self.model_metadata(request.name, request.version))

    async def ModelConfig(self, request, context):
        return await self._call(context, lambda: self.model_config(request.name, request.version))

    async def ModelStatistics(self, request, context):
        return await self._call(context, lambda: self.model_statistics(request.name, request.version))

    # ---- repository ------------------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        return self.repository_index(request.ready)

    def _check_repository_call(self, name: str, what: str) -> None:
        if self.manager.mode != "explicit":
            raise ServeError(Cause.CONTROL_MODE,
                             f"explicit model {what} is not allowed in model control mode '{self.manager.mode}'; "
                             "start pdserve with --model-control-mode explicit")
        if not name:
            raise ServeError(Cause.INVALID_ARGUMENT, f"model_name is empty; name the model to {what}")

    async def RepositoryModelLoad(self, request, context):
        try:
            await self.repository_load(request.model_name)
        except ServeError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            await self.repository_unload(request.model_name)
        except ServeError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # ---- trace and log settings ------------------------------------------------------------------
    async def TraceSetting(self, request, context):
        try:
            update = {k: list(v.value) or None for k, v in request.settings.items()}
            values = (self.settings.update_trace(request.model_name, update) if update
                      else self.settings.trace(request.model_name))
        except ServeError as exc:
            await _abort(context, exc)
        out = pb.TraceSettingResponse()
        for key, value in values.items():
            out.settings[key].value.extend(value)
        return out

    async def LogSettings(self, request, context):
        try:
            update = {key: getattr(value, value.WhichOneof("parameter_choice"))
                      for key, value in request.settings.items() if value.WhichOneof("parameter_choice")}
            values = self.settings.update_log(update) if update else self.settings.log()
        except ServeError as exc:
            await _abort(context, exc)
        out = pb.LogSettingsResponse()
        for key, value in values.items():
            kind = "bool_param" if isinstance(value, bool) else "uint32_param" if isinstance(value, int) else "string_param"
            setattr(out.settings[key], kind, value)
        return out

    # ---- inference ---------------------------------------------------------------------------------
    async def run_request(self, request: pb.ModelInferRequest, streaming_rpc: bool, rpc_remaining: float | None = None):
        """Validates and runs one KServe request through the shared core; yields (ModelInferResponse,
        is_last). Streaming yields one response per text piece; otherwise one with the whole text.
        The request ends by the earlier of the RPC's deadline and its `timeout` parameter.
        The HTTP door runs its infer and generate calls through here too."""
        dep = self.core.lookup(request.model_name, request.model_version)
        async with self.core.request(dep) as req:
            deadline = request_deadline(request, rpc_remaining)
            gen = parse_request(request)
            if gen.wants("logprobs") and gen.sampling.logprobs is None:
                gen = dataclasses.replace(gen, sampling=dataclasses.replace(gen.sampling, logprobs=0))
            stream = streaming_rpc and gen.stream
            prefix = gen.prompt if (not stream and gen.exclude_input_in_output is not True) else ""
            texts = (TokenTexts((await self.core.tokenizers.tokenizer(await self.core.model_folder(dep))).tokenizer)
                     if gen.wants("logprobs") else None)

            def shown(tokens: list[Scored], prompt: list[Scored]) -> str:
                return kserve_logprobs(tokens, prompt, texts) if texts is not None else ""
            siblings = sibling_params(gen.sampling)
            if len(siblings) > 1:
                if stream:
                    raise InvalidInput("sampling_parameters 'n' and 'best_of' above 1 need a request that does not "
                                       "stream (text_output then holds one element per sequence)")
                choices = best(await gather(req, [dataclasses.replace(gen, sampling=p) for p in siblings],
                                           deadline=deadline), gen.sampling.n)
                yield build_response(request, gen, req.n_in, [
                    Sequence(prefix + c.text, c.finish_reason, c.n_out, shown(c.tokens, c.prompt))
                    for c in choices]), True
                return
            choice = Choice()
            async with contextlib.aclosing(req.generate(gen, deadline)) as engine_pieces:
                async for p in engine_pieces:
                    _, tokens, prompt = choice.add(p)
                    if stream and (p.text or p.finish_reason or gen.wants("num_output_tokens") or tokens):
                        yield build_response(request, gen, p.num_input_tokens, [
                            Sequence(p.text, p.finish_reason, p.new_tokens, shown(tokens, prompt))]), \
                            bool(p.finish_reason)
            if not stream:
                yield build_response(request, gen, req.n_in, [
                    Sequence(prefix + choice.text, choice.finish_reason, choice.n_out,
                             shown(choice.tokens, choice.prompt))]), True

    async def ModelInfer(self, request, context):
        try:
            responses = [r async for r, _ in self.run_request(request, False, context.time_remaining())]
            return responses[-1]
        except ServeError as exc:
            await _abort(context, exc)

    async def ModelStreamInfer(self, request_iterator, context):
        """Decoupled streaming: requests run concurrently; each ends with triton_final_response.

        A request has at most one response waiting to be written: while it waits, the request's
        next pieces wait in its engine call, merged into one (cluster/engine_client.py), so a
        slow client or a busy front end gets fewer, larger responses, never a backlog."""
        close_on_error = any(k == "triton_grpc_error" and v.lower() == "true"
                             for k, v in context.invocation_metadata() or ())
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue = asyncio.Queue()   # (response or ServeError, future set once written), or None
        tasks: set[asyncio.Task] = set()

        async def send(response: pb.ModelInferResponse, previous: asyncio.Future | None,
                       deadline: float | None) -> asyncio.Future:
            """Queues a response once the request's previous one is written; returns the future
            that is set when this one is. A client that stops reading holds the request here, so
            the wait is bounded by the request's deadline, as its engine call is."""
            if previous is not None and not previous.done():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(asyncio.shield(previous), left)
                except asyncio.TimeoutError:
                    raise ServeError(Cause.DEADLINE_EXCEEDED, "the request's deadline passed while its "
                                     "responses waited for the client to read the stream") from None
            written = loop.create_future()
            outbox.put_nowait((pb.ModelStreamInferResponse(infer_response=response), written))
            return written

        async def serve_one(request: pb.ModelInferRequest):
            empty_final = request.parameters["triton_enable_empty_final_response"].bool_param \
                if "triton_enable_empty_final_response" in request.parameters else False
            try:
                final = written = None
                try:
                    deadline = request_deadline(request, context.time_remaining())
                except ServeError:   # a bad `timeout`: run_request fails the request with it, counted
                    deadline = None
                # closed here, not by the garbage collector, when this task is cancelled while it
                # waits for its previous response to be written: the engine call ends at once
                async with contextlib.aclosing(self.run_request(request, True, context.time_remaining())) as responses:
                    async for response, last in responses:
                        response.parameters["triton_final_response"].CopyFrom(_bool_param(last and not empty_final))
                        if last:
                            # sent once the request has ended here (its success counted): a client that
                            # closes the stream on its final response then cancels nothing
                            final = response
                            continue
                        try:
                            written = await send(response, written, deadline)
                        except ServeError as exc:
                            # thrown into the request, so it ends (and is counted) with this cause
                            await responses.athrow(exc)
                            raise
                if final is not None:
                    written = await send(final, written, deadline)
                if empty_final:
                    empty = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                                  id=request.id)
                    empty.parameters["triton_final_response"].CopyFrom(_bool_param(True))
                    await send(empty, written, deadline)
            except ServeError as exc:
                outbox.put_nowait((exc, None))
            except Exception as exc:  # never leave a request of the stream without an answer
                log.exception("stream request failed unexpectedly")
                outbox.put_nowait((ServeError(Cause.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"), None))

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
                message, written = item
                if isinstance(message, ServeError):
                    if close_on_error:
                        await _abort(context, message)
                    yield pb.ModelStreamInferResponse(error_message=message.message)
                    continue
                yield message
                if written is not None and not written.done():
                    written.set_result(None)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

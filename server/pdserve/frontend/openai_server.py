"""An OpenAI-compatible API (as Triton's OpenAI frontend and `vllm serve`): `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions`, streaming with server-sent events.

Requests run through the same InferenceCore as the KServe doors (router, PD, metrics, Triton
statistics, cancellation: a client that disconnects cancels its handler and so the engine call).
Requests are validated by the schemas of frontend/protocol.py, whose sampling fields are those of
`sampling_parameters`. Chat prompts are built with the model's chat template
(frontend/chat_templates.py). Errors come in OpenAI's JSON shape: unknown model 404, bad
parameter 400 naming it.
"""
from __future__ import annotations

import contextlib
import time
import uuid

from aiohttp import web

from pdserve.common.errors import Cause, ServeError
from pdserve.frontend.chat_templates import ChatTemplates
from pdserve.frontend.http_common import HttpDoor, openai_status, read_json, sse
from pdserve.frontend.protocol import ChatCompletionRequest, CompletionRequest, InvalidInput, OpenAIRequest
from pdserve.frontend.tensors import GenerationRequest
from pdserve.repository.manager import ModelState


class ModelNotFound(ServeError):
    """An unknown model: 404, as OpenAI answers it (the KServe doors answer Triton's 400)."""

    def __init__(self, name: str):
        super().__init__(Cause.MODEL_UNKNOWN, f"The model '{name}' does not exist; GET /v1/models lists the models served")
        self.param = "model"


def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _openai_status(exc: ServeError) -> tuple[int, str, str | None]:
    if isinstance(exc, ModelNotFound):
        return 404, "invalid_request_error", "model_not_found"
    return openai_status(exc.cause)


def _error_response(exc: ServeError) -> web.Response:
    status, kind, code = _openai_status(exc)
    return web.json_response(error_body(exc.message, kind, getattr(exc, "param", None), code or status), status=status)


def _usage(n_in: int, n_out: int) -> dict:
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


class OpenAIServer:
    def __init__(self, core, manager):
        self.core = core
        self.manager = manager
        self.templates = ChatTemplates()
        self.created = int(time.time())
        app = web.Application(client_max_size=64 * 2**20, middlewares=[self._errors])
        app.add_routes([web.get("/v1/models", self.models), web.get("/v1/models/{model}", self.model),
                        web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.get("/health", self.health)])
        self.door = HttpDoor(app, "OpenAI-compatible API")

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except _Reported as exc:   # already sent as an error event in the stream
            return exc.reply
        except ServeError as exc:
            return _error_response(exc)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return web.json_response(error_body(f"{exc.reason}: {request.method} {request.path}", "invalid_request_error",
                                                    code=exc.status), status=exc.status)
            raise

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "pdserve"}

    async def health(self, request):
        return web.Response(status=200)

    async def models(self, request):
        names = dict.fromkeys(n for n, s in self.manager.index() if s.state == ModelState.READY)
        return web.json_response({"object": "list", "data": [self._model_card(n) for n in names]})

    async def model(self, request):
        name = request.match_info["model"]
        self._lookup(name)
        return web.json_response(self._model_card(name))

    def _lookup(self, name):
        if not isinstance(name, str) or not name:
            raise InvalidInput("'model' is required: name a model from GET /v1/models", "model")
        try:
            return self.core.lookup(name)
        except ServeError as exc:
            if exc.cause == Cause.MODEL_UNKNOWN:
                raise ModelNotFound(name) from exc
            raise

    async def completions(self, request):
        return await self._run(request, CompletionRequest)

    async def chat_completions(self, request):
        return await self._run(request, ChatCompletionRequest)

    async def _prompt(self, dep, call: OpenAIRequest) -> str:
        if isinstance(call, ChatCompletionRequest):
            return self.templates.render(await self.core.model_folder(dep), call.chat(), call.add_generation_prompt)
        return call.prompt

    async def _run(self, request, schema: type[OpenAIRequest]):
        body = await read_json(request, InvalidInput)
        dep = self._lookup(body.get("model"))   # an unknown model answers 404 before anything else
        chat = schema is ChatCompletionRequest
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        async with self.core.request(dep) as req:   # a refused request counts as failed, as on the KServe doors
            call = schema.parse(body)
            prompt = await self._prompt(dep, call)
            echo = "" if chat or not call.echo else prompt
            gen = GenerationRequest(prompt=prompt, sampling=call.sampling_params(), stream=call.stream,
                                    exclude_input_in_output=True)
            async with contextlib.aclosing(req.generate(gen)) as pieces:
                if not call.stream:
                    texts, reason = [echo], ""
                    async for p in pieces:
                        texts.append(p.text)
                        reason = p.finish_reason
                    text = "".join(texts)
                    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                               "finish_reason": reason} if chat else
                              {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
                    return web.json_response({
                        "id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
                        "model": call.model, "choices": [choice], "usage": _usage(req.n_in, req.n_out),
                        "system_fingerprint": None})
                return await self._stream(request, pieces, req, call.model, request_id, created, chat, echo,
                                          call.stream_options.include_usage)

    async def _stream(self, request, pieces, req, model, request_id, created, chat, echo_text, include_usage):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            out = {"id": request_id, "object": kind, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        # The first piece before the headers: a failure up to here answers with its HTTP status.
        first = await anext(pieces, None)
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await reply.prepare(request)
        try:
            if chat:
                await reply.write(sse(chunk(None, None, role=True)))
            if echo_text:
                await reply.write(sse(chunk(echo_text, None)))
            p = first
            while p is not None:
                if p.text:
                    await reply.write(sse(chunk(p.text, None)))
                if p.finish_reason:
                    await reply.write(sse(chunk(None if chat else "", p.finish_reason)))
                p = await anext(pieces, None)
            if include_usage:
                await reply.write(sse({"id": request_id, "object": kind, "created": created, "model": model,
                                       "choices": [], "usage": _usage(req.n_in, req.n_out)}))
        except ServeError as exc:
            status, kind_, code = _openai_status(exc)
            await reply.write(sse(error_body(exc.message, kind_, getattr(exc, "param", None), code or status)))
            await reply.write(sse("[DONE]"))
            await reply.write_eof()
            raise _Reported(reply, exc) from exc
        await reply.write(sse("[DONE]"))
        await reply.write_eof()
        return reply


class _Reported(ServeError):
    """A failure already sent to the client as an error event; the request still counts as failed."""

    def __init__(self, reply, exc: ServeError):
        super().__init__(exc.cause, exc.message)
        self.reply = reply

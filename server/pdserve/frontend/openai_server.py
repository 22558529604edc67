"""An OpenAI-compatible API (as Triton's OpenAI frontend and `vllm serve`): `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions`, streaming with server-sent events, and
vLLM's `POST /tokenize` and `POST /detokenize`.

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
from dataclasses import dataclass

from aiohttp import web

from pdserve.common.errors import Cause, ServeError
from pdserve.frontend.chat_templates import ChatTemplates
from pdserve.frontend.http_common import HttpDoor, openai_status, read_json, sse
from pdserve.frontend.choices import Choice, best, gather, merged
from pdserve.frontend.core import Piece
from pdserve.frontend.logprobs import Scored, TokenTexts, chat_logprobs, completion_logprobs
from pdserve.frontend.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, InvalidInput,
                                       OpenAIRequest, TokenizeRequest, sibling_params)
from pdserve.frontend.tensors import GenerationRequest
from pdserve.frontend import tool_calls
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
                        web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize),
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
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "pdserve"}
        try:
            max_model_len = self.core.max_model_len(self.core.lookup(name))
        except ServeError:   # no longer ready: the card without it
            max_model_len = None
        return card if max_model_len is None else {**card, "max_model_len": max_model_len}

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

    async def tokenize(self, request):
        """vLLM's /tokenize: the prompt's (or the rendered messages') token ids, as the engines get them."""
        body = await read_json(request, InvalidInput)
        dep = self._lookup(body.get("model"))
        call = TokenizeRequest.parse(body)
        folder = await self.core.model_folder(dep)
        text = call.prompt if call.messages is None else self.templates.render(folder, call.chat(),
                                                                               call.add_generation_prompt)
        ids = await self.core.tokenizers.token_ids(folder, text, call.add_special_tokens)
        return web.json_response({"count": len(ids), "max_model_len": self.core.max_model_len(dep), "tokens": ids})

    async def detokenize(self, request):
        """vLLM's /detokenize: token ids back to text."""
        body = await read_json(request, InvalidInput)
        dep = self._lookup(body.get("model"))
        call = DetokenizeRequest.parse(body)
        text = await self.core.tokenizers.text(await self.core.model_folder(dep), call.tokens)
        return web.json_response({"prompt": text})

    async def completions(self, request):
        return await self._run(request, CompletionRequest)

    async def chat_completions(self, request):
        return await self._run(request, ChatCompletionRequest)

    async def _prompt(self, dep, call: OpenAIRequest) -> str:
        if isinstance(call, ChatCompletionRequest):
            return self.templates.render(await self.core.model_folder(dep), call.chat(), call.add_generation_prompt,
                                         call.tools if call.calls_tools else ())
        return call.prompt

    async def _run(self, request, schema: type[OpenAIRequest]):
        body = await read_json(request, InvalidInput)
        dep = self._lookup(body.get("model"))   # an unknown model answers 404 before anything else
        chat = schema is ChatCompletionRequest
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        async with self.core.request(dep) as req:   # a refused request counts as failed, as on the KServe doors
            call = schema.parse(body)
            params = call.sampling_params()
            siblings = sibling_params(params)
            if call.stream and len(siblings) > params.n:
                raise InvalidInput("'best_of' must equal 'n' when streaming (the best are known only at the end)",
                                   "best_of")
            prompt = await self._prompt(dep, call)
            shows_logprobs = bool(call.logprobs) if chat else call.logprobs is not None
            texts = (TokenTexts((await self.core.tokenizers.tokenizer(await self.core.model_folder(dep))).tokenizer)
                     if shows_logprobs else None)
            shape = _Shape(chat, "" if chat or not call.echo else prompt, texts,
                           score_only=not chat and call.max_tokens == 0,
                           tools=call if chat and call.calls_tools else None)
            gens = [GenerationRequest(prompt=prompt, sampling=p, stream=call.stream, exclude_input_in_output=True,
                                      add_special_tokens=call.add_special_tokens) for p in siblings]
            head = {"id": request_id, "created": created, "model": call.model}
            if not call.stream:
                choices = await gather(req, gens, shape.score_only)
                kept = best(choices, params.n)
                return web.json_response({
                    **head, "object": "chat.completion" if chat else "text_completion",
                    "choices": [shape.whole(i, c) for i, c in enumerate(kept)],
                    "usage": _usage(req.n_in, sum(c.n_out for c in choices)), "system_fingerprint": None})
            return await self._stream(request, req, gens, shape, head, call.stream_options.include_usage)

    async def _stream(self, request, req, gens, shape: "_Shape", head: dict, include_usage: bool):
        kind = "chat.completion.chunk" if shape.chat else "text_completion"

        def chunk(choice: dict) -> dict:
            return {**head, "object": kind, "choices": [choice], **({"usage": None} if include_usage else {})}

        async with merged(req, gens) as pieces:
            # The first piece before the headers: a failure up to here answers with its HTTP status.
            first = await anext(pieces, None)
            reply = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await reply.prepare(request)
            choices = [Choice() for _ in gens]
            try:
                if shape.chat:
                    for i in range(len(gens)):
                        await reply.write(sse(chunk(shape.delta(i, {"role": "assistant", "content": ""}, None, None))))
                item = first
                while item is not None:
                    index, piece = item
                    for part in shape.stream_parts(index, choices[index], piece):
                        await reply.write(sse(chunk(part)))
                    item = await anext(pieces, None)
                if include_usage:
                    await reply.write(sse({**head, "object": kind, "choices": [],
                                           "usage": _usage(req.n_in, sum(c.n_out for c in choices))}))
            except ServeError as exc:
                status, kind_, code = _openai_status(exc)
                await reply.write(sse(error_body(exc.message, kind_, getattr(exc, "param", None), code or status)))
                await reply.write(sse("[DONE]"))
                await reply.write_eof()
                raise _Reported(reply, exc) from exc
        await reply.write(sse("[DONE]"))
        await reply.write_eof()
        return reply


@dataclass(frozen=True)
class _Shape:
    """How a request's choices look: chat or completions, the echo, log-probabilities (texts:
    None when not asked), scoring only."""
    chat: bool
    echo: str
    texts: TokenTexts | None
    score_only: bool
    tools: ChatCompletionRequest | None = None   # chat whose output is read for tool calls

    def _message(self, choice: Choice) -> tuple[dict, str]:
        """A chat choice's message and finish reason, its tool calls read from its text."""
        if self.tools is None:
            return {"role": "assistant", "content": choice.text}, choice.finish_reason
        content, calls = tool_calls.parse(choice.text, self.tools.tools, self.tools.tool_choice)
        message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
        return message, "tool_calls" if calls else choice.finish_reason

    def _logprobs(self, tokens: list[Scored], prompt: list[Scored], choice: Choice):
        if self.texts is None:
            return None
        if self.chat:
            return chat_logprobs(tokens, self.texts)
        out, choice.offset = completion_logprobs(prompt + tokens, self.texts, choice.offset)
        return out

    def whole(self, index: int, choice: Choice) -> dict:
        logprobs = self._logprobs(choice.tokens, choice.prompt, choice)
        if self.chat:
            message, reason = self._message(choice)
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": self.echo + choice.text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason}

    def delta(self, index: int, delta: dict, logprobs, reason: str | None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def stream_parts(self, index: int, choice: Choice, piece: Piece) -> list[dict]:
        """The chunks' choices one piece gives: the echo first (completions), its text, its end."""
        text, tokens, prompt = choice.add(piece, self.score_only)
        if self.tools is not None:
            return self._tool_stream_parts(index, choice, piece, text)
        parts = []
        if not self.chat and not choice.started and (self.echo or prompt):
            parts.append({"index": index, "text": self.echo, "logprobs": self._logprobs([], prompt, choice),
                          "finish_reason": None})
        choice.started = True
        if text or tokens:
            logprobs = self._logprobs(tokens, [], choice)
            parts.append(self.delta(index, {"content": text}, logprobs, None) if self.chat else
                         {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None})
        if piece.finish_reason:
            reason = choice.finish_reason
            parts.append(self.delta(index, {}, None, reason) if self.chat else
                         {"index": index, "text": "", "logprobs": None, "finish_reason": reason})
        return parts

    def _tool_stream_parts(self, index: int, choice: Choice, piece: Piece, text: str) -> list[dict]:
        """Output read for tool calls, as OpenAI streams it (tool_calls.CallStream): each call's id
        and name, then its arguments in pieces; or content; then the finish reason."""
        if choice.calls is None:
            choice.calls = tool_calls.CallStream(self.tools.tools, self.tools.tool_choice)
        deltas = choice.calls.feed(text)
        parts = [self.delta(index, d, None, None) for d in deltas]
        if piece.finish_reason:
            last, called = choice.calls.finish()
            parts += [self.delta(index, d, None, None) for d in last]
            parts.append(self.delta(index, {}, None, "tool_calls" if called else choice.finish_reason))
        return parts


class _Reported(ServeError):
    """A failure already sent to the client as an error event; the request still counts as failed."""

    def __init__(self, reply, exc: ServeError):
        super().__init__(exc.cause, exc.message)
        self.reply = reply

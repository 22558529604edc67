"""An OpenAI-compatible API (as Triton's OpenAI frontend and `vllm serve`): `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions`, streaming with server-sent events.

Requests run through the same InferenceCore as the KServe doors (router, PD, metrics, Triton
statistics, cancellation: a client that disconnects cancels its handler and so the engine call).
Sampling settings are validated by the same code as `sampling_parameters`. Chat prompts are built
with the model's chat template (tokenizer_config.json's `chat_template` or chat_template.jinja in
the version folder), rendered with Jinja2 as transformers renders it; a model without one gets
ChatML. Errors come in OpenAI's JSON shape: unknown model 404, bad parameter 400.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid

from aiohttp import web

from pdserve.common.errors import Cause, ServeError
from pdserve.frontend.http_common import HttpDoor, openai_status, read_json, sse
from pdserve.frontend.tensors import GenerationRequest, parse_sampling_parameters
from pdserve.repository.manager import ModelState

log = logging.getLogger(__name__)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MAX_TOKENS_UNSET = 2**31 - 1   # chat without max_tokens: until EOS or max_model_len, as vLLM


class BadRequest(ServeError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(Cause.INVALID_ARGUMENT, message)
        self.param = param


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


# ---- chat templates -----------------------------------------------------------------------------------
class ChatTemplates:
    """The chat template of each model version folder, compiled once."""

    def __init__(self):
        self._cache: dict[str, tuple] = {}

    def load(self, folder: str):
        if folder in self._cache:
            return self._cache[folder]
        template, tokens = None, {}
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                config = json.load(f)
            template = config.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default") or next(iter(named.values()), None)
            for key in ("bos_token", "eos_token"):
                value = config.get(key)
                tokens[key] = value.get("content", "") if isinstance(value, dict) else (value or "")
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if not template and os.path.exists(jinja_path):
            with open(jinja_path) as f:
                template = f.read()
        if not template:
            log.warning("%s has no chat template; chat prompts use ChatML", folder)
            template = CHATML
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise BadRequest(f"the model's chat template refused the messages: {message}", "messages")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        compiled = (env.from_string(template), tokens)
        self._cache[folder] = compiled
        return compiled

    def render(self, folder: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template, tokens = self.load(folder)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
        except ServeError:
            raise
        except Exception as exc:  # a template error is the messages' fault as the client sees it
            raise BadRequest(f"the chat template could not render these messages ({exc})", "messages") from exc


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a 'role' and a 'content'", "messages")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                     "are supported by this text-only model", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({**m, "content": content})
    return out


# ---- request parameters -------------------------------------------------------------------------------
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "min_tokens", "stop_token_ids")
# OpenAI fields pdserve does not implement: accepted only at their neutral value.
NEUTRAL = {"n": (1,), "best_of": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
           "repetition_penalty": (1, 1.0), "logprobs": (False, 0), "top_logprobs": (0,), "suffix": ("",),
           "logit_bias": ({},), "tools": ([],), "use_beam_search": (False,)}


def _sampling(body: dict, chat: bool) -> dict:
    for key, allowed in NEUTRAL.items():
        value = body.get(key)
        if value is not None and value not in allowed:
            raise BadRequest(f"'{key}' is {value!r}; pdserve supports only {allowed[0]!r} (or leaving it out)", key)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise BadRequest("response_format: only {\"type\": \"text\"} is supported", "response_format")
    params = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            params["max_tokens"] = body[key]
            break
    else:
        params["max_tokens"] = MAX_TOKENS_UNSET if chat else 16   # OpenAI's defaults
    return params


def _generation_request(prompt: str, body: dict, chat: bool) -> GenerationRequest:
    params = _sampling(body, chat)
    try:
        sampling = parse_sampling_parameters(json.dumps(params))
    except ServeError as exc:
        match = re.search(r"'(\w+)'", exc.message)
        param = match.group(1) if match else None
        if param == "max_tokens" and chat and body.get("max_completion_tokens") is not None:
            param = "max_completion_tokens"
        raise BadRequest(exc.message.replace("sampling_parameters ", "").replace("'max_tokens'", f"'{param}'")
                         if param else exc.message, param) from exc
    return GenerationRequest(prompt=prompt, sampling=sampling, stream=bool(body.get("stream")),
                             exclude_input_in_output=True)


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
            raise BadRequest("'model' is required: name a model from GET /v1/models", "model")
        try:
            return self.core.lookup(name)
        except ServeError as exc:
            if exc.cause == Cause.MODEL_UNKNOWN:
                raise ModelNotFound(name) from exc
            raise

    async def completions(self, request):
        body = await read_json(request, BadRequest)
        dep = self._lookup(body.get("model"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string (or a list of one string); token-id prompts and "
                             "several prompts per request are not supported", "prompt")
        echo = bool(body.get("echo"))
        return await self._run(request, body, dep, prompt, chat=False, echo=echo)

    async def chat_completions(self, request):
        body = await read_json(request, BadRequest)
        dep = self._lookup(body.get("model"))
        messages = _messages(body)
        prompt = self.templates.render(await self.core.model_folder(dep), messages,
                                       add_generation_prompt=body.get("add_generation_prompt", True) is not False)
        return await self._run(request, body, dep, prompt, chat=True, echo=False)

    async def _run(self, request, body: dict, dep, prompt: str, chat: bool, echo: bool):
        model = body["model"]
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object such as {\"include_usage\": true}", "stream_options")
        include_usage = stream and bool(options.get("include_usage"))
        async with self.core.request(dep) as req:
            gen = _generation_request(prompt, body, chat)
            async with contextlib.aclosing(req.generate(gen)) as pieces:
                if not stream:
                    texts, reason = [prompt] if echo else [], ""
                    async for p in pieces:
                        texts.append(p.text)
                        reason = p.finish_reason
                    text = "".join(texts)
                    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                               "finish_reason": reason} if chat else
                              {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
                    return web.json_response({
                        "id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
                        "model": model, "choices": [choice], "usage": _usage(req.n_in, req.n_out),
                        "system_fingerprint": None})
                return await self._stream(request, pieces, req, model, request_id, created, chat,
                                          prompt if echo else "", include_usage)

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

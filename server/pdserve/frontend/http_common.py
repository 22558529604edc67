"""What the two HTTP doors (KServe v2 REST, OpenAI) share: the one table from a failure's cause
to its HTTP status, and serving an aiohttp application on the front end's own event loop."""
from __future__ import annotations

import json
import logging
import ssl

from aiohttp import web

from pdserve.common.errors import Cause

log = logging.getLogger(__name__)

#  cause                  KServe v2 HTTP (as Triton's HTTP server)   OpenAI status, error type, code
HTTP_STATUS: dict[Cause, tuple[int, int, str, str | None]] = {
    Cause.INVALID_ARGUMENT:     (400, 400, "invalid_request_error", None),
    Cause.INPUT_TOO_LARGE:      (413, 400, "invalid_request_error", "input_too_large"),
    Cause.OVERLOADED:           (429, 429, "rate_limit_error", "overloaded"),
    Cause.MODEL_UNKNOWN:        (400, 404, "invalid_request_error", "model_not_found"),   # 400: as Triton
    Cause.MODEL_NOT_FOUND:      (404, 404, "invalid_request_error", "model_not_found"),
    Cause.MODEL_NOT_READY:      (503, 503, "service_unavailable", "model_not_ready"),
    Cause.MODEL_LOAD_FAILED:    (400, 400, "invalid_request_error", None),
    Cause.CONTROL_MODE:         (503, 503, "service_unavailable", None),
    Cause.NO_ENGINE:            (503, 503, "service_unavailable", "no_engine"),
    Cause.ENGINE_FAILURE:       (503, 503, "service_unavailable", "engine_failure"),
    Cause.KV_HANDOFF_TIMEOUT:   (503, 503, "service_unavailable", "kv_handoff"),
    Cause.KV_HANDOFF_PEER_LOST: (503, 503, "service_unavailable", "kv_handoff"),
    Cause.KV_TRANSFER_ERROR:    (503, 503, "service_unavailable", "kv_handoff"),
    Cause.CANCELLED:            (499, 499, "cancelled", None),
    Cause.DEADLINE_EXCEEDED:    (504, 504, "timeout", None),
    Cause.INTERNAL:             (500, 500, "server_error", None),
}
assert set(HTTP_STATUS) == set(Cause), "every cause needs its HTTP statuses"


def kserve_status(cause: Cause) -> int:
    return HTTP_STATUS[cause][0]


def openai_status(cause: Cause) -> tuple[int, str, str | None]:
    return HTTP_STATUS[cause][1:]


def sse(payload) -> bytes:
    """One server-sent event carrying JSON (or a literal such as [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def read_json(request: web.Request, error) -> dict:
    """The request body as a JSON object, or error(message) raised as the door's 400 answer."""
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"the request body is not valid JSON ({exc}); send a JSON object") from exc
    if not isinstance(body, dict):
        raise error("the request body must be a JSON object")
    return body


@web.middleware
async def _client_gone(request, handler):
    """A stream's write to a connection the client already closed raises ConnectionResetError
    (aiohttp's ClientConnectionResetError): the request scope has counted it as cancelled; here
    it ends quietly instead of being logged as a server error with a 500 nobody can read."""
    try:
        return await handler(request)
    except ConnectionResetError:
        log.debug("client went away during %s %s", request.method, request.path)
        return web.Response(status=499)


class HttpDoor:
    """Serves an aiohttp application on the running event loop (the one the gRPC server and the
    engines' clients use). A client that disconnects cancels its handler, which cancels the
    engine call and frees the request's blocks."""

    def __init__(self, app: web.Application, name: str):
        app.middlewares.insert(0, _client_gone)
        self.app = app
        self.name = name
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Serves on host:port, over TLS when given a context (frontend/security.py)."""
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=3)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port, ssl_context=ssl_context).start()
        log.info("%s on %s://%s:%d", self.name, "https" if ssl_context else "http", host, port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

"""KServe v2 HTTP/REST (Triton's HTTP endpoint): the same service as the gRPC door.

Health, metadata, config, statistics and the repository answers come from the gRPC service's own
methods (converted to JSON as Triton writes them); `infer` turns its JSON header and the binary
tensor extension into a ModelInferRequest and runs it through the same request path as gRPC
(service.run_request -> InferenceCore). Triton's generate extension: `generate` answers one JSON
object, `generate_stream` one server-sent event per text piece. Errors are `{"error": "..."}`
with Triton's HTTP status (http_common.HTTP_STATUS).
"""
from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
from aiohttp import web

from pdserve._proto import grpc_service_pb2 as pb
from pdserve.common.errors import ServeError
from pdserve.frontend import trtllm
from pdserve.frontend.http_common import HttpDoor, kserve_status, read_json, sse
from pdserve.frontend.protocol import InvalidInput
from pdserve.frontend.settings import Settings
from pdserve.frontend.tensors import BOOL_INPUTS, BYTES_INPUTS, serialize_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMPY = {"BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "<u1",
         "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _as_json(message) -> dict:
    """A message as Triton's HTTP server writes it: proto field names, enums by name, and 64-bit
    integers as JSON numbers (protobuf's JSON mapping would write them as strings)."""
    def value(field, v):
        if field.type == field.TYPE_MESSAGE:
            return _as_json(v)
        if field.type == field.TYPE_ENUM:
            return field.enum_type.values_by_number[v].name if v in field.enum_type.values_by_number else v
        if field.type == field.TYPE_BYTES:
            return v.decode("utf-8", errors="replace")
        return v
    out = {}
    for field in message.DESCRIPTOR.fields:
        if field.label != field.LABEL_REPEATED and (field.message_type is not None or field.containing_oneof) \
                and not message.HasField(field.name):
            continue   # unset sub-messages and oneof members; scalars print even at zero, as Triton does
        v = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: value(value_field, item) for k, item in v.items()}
        elif field.label == field.LABEL_REPEATED:
            out[field.name] = [value(field, item) for item in v]
        else:
            out[field.name] = value(field, v)
    return out


def _flatten(data) -> list:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _raw_from_json(name: str, datatype: str, data) -> bytes:
    """A JSON tensor's "data" (row-major, possibly nested) as raw contents."""
    values = _flatten(data)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"input '{name}': BYTES data must be strings")
        return serialize_bytes([v.encode("utf-8") for v in values])
    if datatype not in NUMPY:
        raise InvalidInput(f"input '{name}' has unknown datatype '{datatype}'")
    try:
        return np.array(values, dtype=NUMPY[datatype]).tobytes()
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': data {data!r} is not {datatype} ({exc})") from exc


def set_parameter(param: pb.InferParameter, key: str, value) -> None:
    """One KServe v2 JSON request parameter as its gRPC InferParameter."""
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int) and -2**63 <= value < 2**63:
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise InvalidInput(f"request parameter '{key}' is {value!r}; a parameter is one boolean, integer, number or "
                           "string (send lists such as 'stop' in the sampling_parameters input)")


def infer_request_from_http(name: str, version: str, header: dict, binary: bytes) -> tuple[pb.ModelInferRequest, bool, set]:
    """The KServe v2 JSON (+ binary tensors) as a ModelInferRequest; also whether all outputs go
    binary and which named outputs do."""
    request = pb.ModelInferRequest(model_name=name, model_version=version, id=str(header.get("id", "")))
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("the request has no 'inputs'; send a list of tensors such as "
                           '{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]}')
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput("each input must be an object with 'name', 'datatype', 'shape' and 'data'")
        tname, datatype, shape = tensor["name"], tensor.get("datatype", ""), tensor.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise InvalidInput(f"input '{tname}': 'shape' must be a list of integers")
        request.inputs.add(name=tname, datatype=datatype, shape=shape)
        params = tensor.get("parameters") or {}
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input '{tname}': binary_data_size {size!r} runs past the {len(binary)} bytes "
                                   "of binary data after the JSON header")
            request.raw_input_contents.append(binary[offset:offset + size])
            offset += size
        elif "data" in tensor:
            request.raw_input_contents.append(_raw_from_json(tname, datatype, tensor["data"]))
        else:
            raise InvalidInput(f"input '{tname}' has neither 'data' nor a 'binary_data_size' parameter")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be a JSON object such as {\"max_tokens\": 32}")
    for key, value in parameters.items():   # as over gRPC: timeout, sampling settings, ...
        set_parameter(request.parameters[key], key, value)
    all_binary = bool(parameters.get("binary_data_output", False))
    binary_outputs = set()
    for out in header.get("outputs") or []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput("each requested output must be an object with a 'name'")
        request.outputs.add(name=out["name"])
        if (out.get("parameters") or {}).get("binary_data", False):
            binary_outputs.add(out["name"])
    return request, all_binary, binary_outputs


def _decode_output(datatype: str, raw: bytes) -> list:
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            (n,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4:offset + 4 + n].decode("utf-8", errors="replace"))
            offset += 4 + n
        return items
    return np.frombuffer(raw, dtype=NUMPY[datatype]).tolist()


def infer_response_to_http(response: pb.ModelInferResponse, all_binary: bool, binary_outputs: set) -> web.Response:
    header = {"model_name": response.model_name, "model_version": response.model_version or "1", "outputs": []}
    if response.id:
        header["id"] = response.id
    chunks = []
    for out, raw in zip(response.outputs, response.raw_output_contents):
        entry = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if all_binary or out.name in binary_outputs:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _decode_output(out.datatype, raw)
        header["outputs"].append(entry)
    body = json.dumps(header).encode()
    if not chunks:
        return web.Response(body=body, content_type="application/json")
    return web.Response(body=body + b"".join(chunks), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(body))})


def generate_request_from_json(name: str, version: str, body: dict, stream_default: bool) -> pb.ModelInferRequest:
    """Triton's generate extension: each top-level key is an input tensor of shape [1];
    'parameters' holds sampling settings (and 'stream'), as Triton's vLLM backend reads them."""
    request = pb.ModelInferRequest(model_name=name, model_version=version, id=str(body.get("id", "")))
    values = {k: v for k, v in body.items() if k not in ("id", "parameters")}
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be a JSON object such as {\"max_tokens\": 32, \"temperature\": 0}")
    sampling = {}
    for key, value in params.items():
        if key in BOOL_INPUTS:
            values.setdefault(key, value)
        else:
            sampling[key] = value
    if "sampling_parameters" in values:
        given = values["sampling_parameters"]
        if isinstance(given, str):
            try:
                given = json.loads(given)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"sampling_parameters is not valid JSON ({exc})") from exc
        if not isinstance(given, dict):
            raise InvalidInput("sampling_parameters must be a JSON object such as {\"max_tokens\": 64}")
        sampling = {**given, **sampling}
    values.pop("sampling_parameters", None)
    if sampling:
        values["sampling_parameters"] = json.dumps(sampling)
    values.setdefault("stream", stream_default)
    for key, value in values.items():
        if key in BYTES_INPUTS or (key in trtllm.NAMES and trtllm.INPUTS[key][0] == ("BYTES",)):
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                raise InvalidInput(f"'{key}' must be a string")
            datatype, raw = "BYTES", serialize_bytes([v.encode("utf-8") for v in items])
            shape = [len(items)]
        elif key in BOOL_INPUTS or (key in trtllm.NAMES and trtllm.INPUTS[key][0] == ("BOOL",)):
            if not isinstance(value, bool):
                raise InvalidInput(f"'{key}' must be true or false")
            datatype, raw, shape = "BOOL", bytes([value]), [1]
        elif key in trtllm.NAMES:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"'{key}' must be a number")
            integer = trtllm.INPUTS[key][0] == trtllm.INTEGER
            if integer and not float(value).is_integer():
                raise InvalidInput(f"'{key}' is {value!r}; it must be an integer")
            datatype = "INT64" if integer else "FP64"
            raw, shape = np.array([value], dtype=NUMPY[datatype]).tobytes(), [1]
        else:
            raise InvalidInput(f"unexpected input '{key}' for model '{name}'; send 'text_input' and optional "
                               f"{', '.join(BOOL_INPUTS)}, with sampling settings under 'parameters'")
        request.inputs.add(name=key, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def _outputs_as_json(response: pb.ModelInferResponse) -> dict:
    out = {"model_name": response.model_name, "model_version": response.model_version or "1"}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        values = _decode_output(tensor.datatype, raw)
        out[tensor.name] = values[0] if len(values) == 1 else values
    return out


class KServeHttp:
    def __init__(self, service, settings: Settings):
        self.service = service
        self.settings = settings
        app = web.Application(client_max_size=64 * 2**20, middlewares=[self._errors])
        m = "/v2/models/{model}"
        v = "/v2/models/{model}/versions/{version}"
        app.add_routes([
            web.get("/v2/health/live", self.live), web.get("/v2/health/ready", self.ready),
            web.get("/v2", self.server_metadata),
            web.get("/v2/models/stats", self.statistics),
            web.get(m, self.model_metadata), web.get(v, self.model_metadata),
            web.get(m + "/ready", self.model_ready), web.get(v + "/ready", self.model_ready),
            web.get(m + "/config", self.model_config), web.get(v + "/config", self.model_config),
            web.get(m + "/stats", self.statistics), web.get(v + "/stats", self.statistics),
            web.post(m + "/infer", self.infer), web.post(v + "/infer", self.infer),
            web.post(m + "/generate", self.generate), web.post(v + "/generate", self.generate),
            web.post(m + "/generate_stream", self.generate_stream),
            web.post(v + "/generate_stream", self.generate_stream),
            web.post("/v2/repository/index", self.repository_index),
            web.post("/v2/repository/models/{model}/load", self.load),
            web.post("/v2/repository/models/{model}/unload", self.unload),
            web.get("/v2/trace/setting", self.trace_get), web.post("/v2/trace/setting", self.trace_update),
            web.get(m + "/trace/setting", self.trace_get), web.post(m + "/trace/setting", self.trace_update),
            web.get("/v2/logging", self.log_get), web.post("/v2/logging", self.log_update),
        ])
        self.door = HttpDoor(app, "KServe v2 HTTP")

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except ServeError as exc:
            return _error(kserve_status(exc.cause), exc.message)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.status, f"{exc.reason}: {request.method} {request.path}"
                              + (" is not a KServe v2 endpoint" if exc.status == 404 else ""))
            raise

    @staticmethod
    def _names(request) -> tuple[str, str]:
        return request.match_info.get("model", ""), request.match_info.get("version", "")

    async def live(self, request):
        return web.Response(status=200)

    async def ready(self, request):
        return web.Response(status=200 if self.service.server_ready() else 400)

    async def model_ready(self, request):
        return web.Response(status=200 if self.service.model_ready(*self._names(request)) else 400)

    async def server_metadata(self, request):
        return web.json_response(_as_json(self.service.server_metadata()))

    async def model_metadata(self, request):
        return web.json_response(_as_json(self.service.model_metadata(*self._names(request))))

    async def model_config(self, request):
        return web.json_response(_as_json(self.service.model_config(*self._names(request)).config))

    async def statistics(self, request):
        return web.json_response(_as_json(self.service.model_statistics(*self._names(request))))

    async def repository_index(self, request):
        body = await read_json(request, InvalidInput) if request.can_read_body else {}
        index = self.service.repository_index(bool(body.get("ready", False)))
        return web.json_response([_as_json(m) for m in index.models])

    async def load(self, request):
        await self.service.repository_load(request.match_info["model"])
        return web.Response(status=200)

    async def unload(self, request):
        await self.service.repository_unload(request.match_info["model"])
        return web.Response(status=200)

    async def trace_get(self, request):
        return web.json_response(self.settings.trace(request.match_info.get("model", "")))

    async def trace_update(self, request):
        body = await read_json(request, InvalidInput)
        return web.json_response(self.settings.update_trace(request.match_info.get("model", ""), body))

    async def log_get(self, request):
        return web.json_response(self.settings.log())

    async def log_update(self, request):
        return web.json_response(self.settings.update_log(await read_json(request, InvalidInput)))

    # ---- inference ---------------------------------------------------------------------------------
    async def infer(self, request):
        body = await request.read()
        length = request.headers.get(HEADER_LENGTH)
        try:
            split = int(length) if length is not None else len(body)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} is {length!r}; it must be the JSON header's length in bytes") from None
        if not 0 <= split <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {split} but the body has {len(body)} bytes")
        try:
            header = json.loads(body[:split])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"the request's JSON header does not parse ({exc})") from exc
        if not isinstance(header, dict):
            raise InvalidInput("the request's JSON header must be an object")
        infer, all_binary, binary_outputs = infer_request_from_http(*self._names(request), header, body[split:])
        responses = [r async for r, _ in self.service.run_request(infer, streaming_rpc=False)]
        return infer_response_to_http(responses[-1], all_binary, binary_outputs)

    async def generate(self, request):
        body = await read_json(request, InvalidInput)
        infer = generate_request_from_json(*self._names(request), body, stream_default=False)
        responses = [r async for r, _ in self.service.run_request(infer, streaming_rpc=False)]
        return web.json_response(_outputs_as_json(responses[-1]))

    async def generate_stream(self, request):
        body = await read_json(request, InvalidInput)
        infer = generate_request_from_json(*self._names(request), body, stream_default=True)
        async with contextlib.aclosing(self.service.run_request(infer, streaming_rpc=True)) as responses:
            first = await anext(responses, None)   # an error before the first piece answers with its status
            reply = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await reply.prepare(request)
            try:
                if first is not None:
                    await reply.write(sse(_outputs_as_json(first[0])))
                    async for response, _ in responses:
                        await reply.write(sse(_outputs_as_json(response)))
            except ServeError as exc:
                await reply.write(sse({"error": exc.message}))
            await reply.write_eof()
            return reply


__all__ = ["KServeHttp"]

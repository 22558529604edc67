"""KServe v2 tensors <-> generation requests, with the interface of Triton's vLLM backend.

Inputs: text_input (BYTES), stream, exclude_input_in_output, return_finish_reason,
return_num_input_tokens, return_num_output_tokens, return_logprobs (BOOL), sampling_parameters
(BYTES, JSON). With n > 1 (sampling_parameters), text_output, finish_reason, num_output_tokens
and logprobs hold one element per sequence.
BYTES tensors come as contents.bytes_contents or as raw_input_contents, where each element
is a 4-byte little-endian length followed by the bytes. The sampling settings, however they come
(the JSON, request parameters, TensorRT-LLM-style tensors), are validated by one schema,
protocol.SamplingParameters, which the OpenAI door's requests share.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

from pdserve.common.constants import MAX_PROMPT_BYTES
from pdserve.common.errors import Cause, ServeError
from pdserve.common.sampling import SamplingParams
from pdserve.frontend import trtllm
from pdserve.frontend.protocol import InvalidInput, SamplingParameters
from pdserve.repository.config import INPUTS, OUTPUTS


BOOL_INPUTS = tuple(name for name, datatype, _ in INPUTS if datatype == "BOOL")
BYTES_INPUTS = tuple(name for name, datatype, _ in INPUTS if datatype == "BYTES")
OUTPUT_NAMES = tuple(name for name, _ in OUTPUTS)


@dataclass
class GenerationRequest:
    prompt: str
    sampling: SamplingParams
    stream: bool = False
    add_special_tokens: bool = True   # False for a chat template's text, which has them already
    exclude_input_in_output: bool | None = None
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    return_logprobs: bool = False
    requested_outputs: list[str] = field(default_factory=list)

    def wants(self, output: str) -> bool:
        """Requested outputs, as Triton: all of them when the request names none."""
        if self.requested_outputs:
            return output in self.requested_outputs
        return output == "text_output" or getattr(self, f"return_{output}", False)


def _deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input '{name}': raw BYTES contents end inside a length prefix; each element "
                               "needs a 4-byte little-endian length followed by its bytes")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"input '{name}': a raw BYTES element claims {length} bytes but only "
                               f"{len(raw) - offset} remain")
        items.append(raw[offset:offset + length])
        offset += length
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _elements(tensor, raw: bytes | None) -> list:
    name, dtype = tensor.name, tensor.datatype
    expected_dtype = "BYTES" if name in BYTES_INPUTS else "BOOL"
    if dtype != expected_dtype:
        raise InvalidInput(f"input '{name}' has datatype {dtype or '(none)'}; send it as {expected_dtype}")
    if any(d < 0 for d in tensor.shape):
        raise InvalidInput(f"input '{name}' has shape {list(tensor.shape)}; dimensions cannot be negative")
    count = math.prod(tensor.shape) if tensor.shape else 0
    if raw is not None:
        values = _deserialize_bytes(raw, name) if dtype == "BYTES" else [b != 0 for b in raw]
    elif dtype == "BYTES":
        values = list(tensor.contents.bytes_contents)
    else:
        values = list(tensor.contents.bool_contents)
    if count != 1:
        raise InvalidInput(f"input '{name}' has shape {list(tensor.shape)}; send exactly one element (shape [1]); "
                           "batch prompts as separate requests")
    if len(values) != 1:
        raise InvalidInput(f"input '{name}' has shape {list(tensor.shape)} but carries {len(values)} elements; "
                           "the data must hold exactly one element")
    return values


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"input '{name}' is not valid UTF-8 ({exc}); encode the text as UTF-8") from exc


SAMPLING_KEYS = tuple(SamplingParameters.model_fields)


def parse_sampling_parameters(text: str | None, extra: dict | None = None) -> SamplingParams:
    """The JSON sampling_parameters, with `extra` (settings sent as their own tensors) on top."""
    params = {}
    if text:
        try:
            params = json.loads(text)
        except (ValueError, RecursionError) as exc:  # ValueError: also over-long integers
            raise InvalidInput(f"sampling_parameters is not valid JSON ({type(exc).__name__}: {exc}); send a flat "
                               'JSON object such as {"max_tokens": 64, "temperature": 0}') from exc
        if not isinstance(params, dict):
            raise InvalidInput("sampling_parameters must be a JSON object such as {\"max_tokens\": 64}")
    return SamplingParameters.parse({**params, **(extra or {})}, "sampling_parameters ").sampling_params()


def sampling_from_request_parameters(request) -> dict:
    """Sampling settings sent as request parameters (tritonclient's `parameters={"max_tokens": 12}`),
    as Triton's vLLM backend also reads them; the protocol's own request parameters (timeout,
    priority, ...) are not sampling keys and stay with the code that reads them."""
    settings = {}
    for key in SAMPLING_KEYS:
        if key in request.parameters:
            param = request.parameters[key]
            which = param.WhichOneof("parameter_choice")
            settings[key] = getattr(param, which) if which else None
    return settings


def parse_request(request) -> GenerationRequest:
    """Validates the tensors of one ModelInferRequest; raises InvalidInput."""
    model = request.model_name
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"the request has {len(request.inputs)} inputs but {len(request.raw_input_contents)} "
                           "raw_input_contents; send one raw content per input, or none")
    values: dict[str, object] = {}
    trtllm_values: dict[str, list] = {}  # TensorRT-LLM-style settings, one tensor each
    for i, tensor in enumerate(request.inputs):
        if tensor.name in values or tensor.name in trtllm_values:
            raise InvalidInput(f"input '{tensor.name}' is given twice; send it once")
        raw = request.raw_input_contents[i] if request.raw_input_contents else None
        if tensor.name not in BOOL_INPUTS + BYTES_INPUTS:
            if tensor.name in trtllm.NAMES:
                trtllm_values[tensor.name] = trtllm.read_tensor(tensor, raw, _deserialize_bytes)
                continue
            raise InvalidInput(f"unexpected inference input '{tensor.name}' for model '{model}'; "
                               f"expected inputs: {', '.join(BYTES_INPUTS + BOOL_INPUTS)} "
                               f"(or TensorRT-LLM-style: {', '.join(trtllm.NAMES)})")
        values[tensor.name] = _elements(tensor, raw)[0]
    if "text_input" not in values:
        raise InvalidInput(f"expected 'text_input' for model '{model}'; send the prompt as a BYTES tensor of shape [1]")
    for out in request.outputs:
        if out.name not in OUTPUT_NAMES:
            raise InvalidInput(f"unexpected inference output '{out.name}' for model '{model}'; "
                               f"outputs: {', '.join(OUTPUT_NAMES)}")
    if len(values["text_input"]) > MAX_PROMPT_BYTES:
        raise ServeError(Cause.INPUT_TOO_LARGE,
                         f"text_input is {len(values['text_input'])} bytes; the limit is {MAX_PROMPT_BYTES} bytes "
                         f"({MAX_PROMPT_BYTES // 2**20} MiB): shorten the prompt")
    sampling_text = values.get("sampling_parameters")
    gen = GenerationRequest(
        prompt=_text(values["text_input"], "text_input"),
        # the sampling_parameters tensor, then request parameters, then TensorRT-LLM-style tensors
        sampling=parse_sampling_parameters(_text(sampling_text, "sampling_parameters") if sampling_text else None,
                                           {**sampling_from_request_parameters(request),
                                            **trtllm.sampling_from_tensors(trtllm_values)}),
        stream=bool(values.get("stream", False)),
        exclude_input_in_output=values.get("exclude_input_in_output"),
        return_finish_reason=bool(values.get("return_finish_reason", False)),
        return_num_input_tokens=bool(values.get("return_num_input_tokens", False)),
        return_num_output_tokens=bool(values.get("return_num_output_tokens", False)),
        return_logprobs=bool(values.get("return_logprobs", False)),
        requested_outputs=[o.name for o in request.outputs])
    if gen.stream and gen.exclude_input_in_output is False:
        raise InvalidInput("exclude_input_in_output=false is not allowed when streaming; "
                           "drop it or set it to true (streamed pieces never repeat the prompt)")
    return gen

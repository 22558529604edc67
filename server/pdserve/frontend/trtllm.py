"""TensorRT-LLM-style request tensors, as Triton's TensorRT-LLM ensemble takes them.

Clients written for that backend (LlamaIndex's and LangChain's Triton integrations, the
TensorRT-LLM examples) send the prompt as `text_input` and each sampling setting as its own
tensor (`max_tokens` INT32, `temperature` FP32, ...), usually of shape [1, 1]. This module reads
those tensors and maps them onto the vLLM-backend `sampling_parameters` keys, so they are
validated once, by protocol.SamplingParameters. Settings pdserve cannot honour are refused
with a message, unless they carry their neutral value (LangChain sends `repetition_penalty` 1.0).
"""
from __future__ import annotations

import math

import numpy as np

from pdserve.frontend.protocol import InvalidInput

# KServe datatype -> (little-endian numpy dtype for raw contents, InferTensorContents field)
DATATYPES = {
    "BOOL": ("?", "bool_contents"), "INT8": ("<i1", "int_contents"), "INT16": ("<i2", "int_contents"),
    "INT32": ("<i4", "int_contents"), "INT64": ("<i8", "int64_contents"), "UINT8": ("<u1", "uint_contents"),
    "UINT16": ("<u2", "uint_contents"), "UINT32": ("<u4", "uint_contents"), "UINT64": ("<u8", "uint64_contents"),
    "FP16": ("<f2", None), "FP32": ("<f4", "fp32_contents"), "FP64": ("<f8", "fp64_contents"),
}
INTEGER = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
NUMBER = INTEGER + ("FP16", "FP32", "FP64")

# tensor name -> (accepted datatypes, sampling_parameters key or None when only checked)
INPUTS = {
    "max_tokens": (INTEGER, "max_tokens"),
    "request_output_len": (INTEGER, "max_tokens"),
    "temperature": (NUMBER, "temperature"),
    "top_k": (INTEGER, "top_k"),
    "runtime_top_k": (INTEGER, "top_k"),
    "top_p": (NUMBER, "top_p"),
    "runtime_top_p": (NUMBER, "top_p"),
    "random_seed": (INTEGER, "seed"),
    "seed": (INTEGER, "seed"),
    "min_length": (INTEGER, "min_tokens"),
    "min_tokens": (INTEGER, "min_tokens"),
    "end_id": (INTEGER, "stop_token_ids"),
    "stop_words": (("BYTES",), "stop"),
    "pad_id": (INTEGER, None),
    "bad_words": (("BYTES",), "bad_words"),
    "beam_width": (INTEGER, None),
    "num_return_sequences": (INTEGER, None),
    "repetition_penalty": (NUMBER, None),
    "presence_penalty": (NUMBER, None),
    "frequency_penalty": (NUMBER, None),
    "length_penalty": (NUMBER, None),
    "return_log_probs": (("BOOL",), None),
    "return_context_logits": (("BOOL",), None),
    "return_generation_logits": (("BOOL",), None),
}
NAMES = tuple(INPUTS)

# Only these values are accepted for the settings pdserve does not implement.
NEUTRAL = {"beam_width": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "presence_penalty": 0.0,
           "frequency_penalty": 0.0, "return_log_probs": False, "return_context_logits": False,
           "return_generation_logits": False}


def read_tensor(tensor, raw: bytes | None, deserialize_bytes) -> list:
    """The elements of one input tensor, flattened (numbers as Python numbers, BYTES as bytes)."""
    name, dtype = tensor.name, tensor.datatype
    accepted = INPUTS[name][0]
    if dtype not in accepted:
        raise InvalidInput(f"input '{name}' has datatype {dtype or '(none)'}; send it as "
                       f"{'INT32' if accepted is INTEGER else 'FP32' if accepted is NUMBER else accepted[0]}")
    if any(d < 0 for d in tensor.shape):
        raise InvalidInput(f"input '{name}' has shape {list(tensor.shape)}; dimensions cannot be negative")
    count = math.prod(tensor.shape) if tensor.shape else 0
    if dtype == "BYTES":
        values = deserialize_bytes(raw, name) if raw is not None else list(tensor.contents.bytes_contents)
    elif raw is not None:
        np_dtype = DATATYPES[dtype][0]
        if len(raw) % np.dtype(np_dtype).itemsize:
            raise InvalidInput(f"input '{name}': {len(raw)} raw bytes are not a whole number of {dtype} elements")
        values = np.frombuffer(raw, dtype=np_dtype).tolist()
    else:
        field = DATATYPES[dtype][1]
        if field is None:
            raise InvalidInput(f"input '{name}' of datatype {dtype} must come as raw contents (binary data)")
        values = list(getattr(tensor.contents, field))
    if len(values) != count:
        raise InvalidInput(f"input '{name}' has shape {list(tensor.shape)} but carries {len(values)} elements")
    if dtype != "BYTES" and count != 1:
        raise InvalidInput(f"input '{name}' has shape {list(tensor.shape)}; send exactly one value (shape [1] or [1, 1])")
    return values


def sampling_from_tensors(values: dict[str, list]) -> dict:
    """TensorRT-LLM tensors -> sampling_parameters keys (validated later, with the JSON ones)."""
    out: dict = {}
    for name, elements in values.items():
        key = INPUTS[name][1]
        if name in NEUTRAL:
            value = elements[0]
            if (value != NEUTRAL[name]) if not isinstance(NEUTRAL[name], float) else not math.isclose(value, NEUTRAL[name]):
                raise InvalidInput(f"input '{name}' is {value!r}; pdserve supports only {NEUTRAL[name]!r} here "
                               "(no beam search, one sequence per request, no penalties or logits); "
                               "drop the input or send that value")
            continue
        if key is None:  # pad_id, length_penalty: no effect here
            continue
        if key in ("stop", "bad_words"):
            words = [w.decode("utf-8", errors="replace") for w in elements if w]
            if words:
                out[key] = words
        elif key == "stop_token_ids":
            out["stop_token_ids"] = [int(v) for v in elements]
        elif key == "top_p" and elements[0] == 0:
            out["top_p"] = 1.0  # TensorRT-LLM: top_p 0 turns it off
        else:
            out[key] = elements[0]
    return out

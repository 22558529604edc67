"""Builds ModelInferResponses: outputs as raw contents, as Triton sends them."""
from __future__ import annotations

import struct

from pdserve._proto import grpc_service_pb2 as pb
from pdserve.frontend.tensors import GenerationRequest, serialize_bytes


def build_response(request: pb.ModelInferRequest, gen: GenerationRequest, text: str, finish_reason: str,
                   num_input_tokens: int, num_output_tokens: int) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                     id=request.id)
    def add(name: str, datatype: str, raw: bytes) -> None:
        response.outputs.add(name=name, datatype=datatype, shape=[1])
        response.raw_output_contents.append(raw)
    if gen.wants("text_output"):
        add("text_output", "BYTES", serialize_bytes([text.encode("utf-8")]))
    if gen.wants("finish_reason") and finish_reason:
        add("finish_reason", "BYTES", serialize_bytes([finish_reason.encode("utf-8")]))
    if gen.wants("num_input_tokens"):
        add("num_input_tokens", "UINT32", struct.pack("<I", num_input_tokens))
    if gen.wants("num_output_tokens"):
        add("num_output_tokens", "UINT32", struct.pack("<I", num_output_tokens))
    return response

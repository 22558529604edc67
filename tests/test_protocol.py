"""The KServe v2 protocol through the real tritonclient against a real server process."""
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from pdserve_testing.harness import inputs

GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}


def infer_text(server, prompt, params=None, **flags):
    result = server.client.infer("small", inputs(prompt, False, params or GREEDY, **flags))
    return result


def stream_request(client, model, tensors, empty_final=False, timeout=60):
    """Sends one streaming request; returns the list of results up to the final flag."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, tensors, enable_empty_final_response=empty_final)
        out = []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise error
            out.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()


def test_health_and_metadata(served):
    c = served.client
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("small") and c.is_model_ready("small", "1")
    assert not c.is_model_ready("small", "2") and not c.is_model_ready("missing")
    meta = c.get_server_metadata()
    assert meta.name == "pdserve" and "model_repository" in meta.extensions
    model = c.get_model_metadata("small")
    assert model.versions == ["1"]
    assert {i.name: i.datatype for i in model.inputs}["text_input"] == "BYTES"
    assert {o.name: o.datatype for o in model.outputs} == {
        "text_output": "BYTES", "finish_reason": "BYTES", "num_input_tokens": "UINT32", "num_output_tokens": "UINT32",
        "logprobs": "BYTES"}


def test_model_config_parsed_by_tritonclient(served):
    config = served.client.get_model_config("small", as_json=True)["config"]
    assert config["name"] == "small"
    assert config["model_transaction_policy"]["decoupled"] is True
    group = config["instance_group"][0]
    assert (group["name"], group["kind"], group["count"]) == ("small_both_0", "KIND_CPU", 1)
    assert config["parameters"]["max_model_len"]["string_value"] == "512"


def test_repository_index(served):
    index = served.client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "small", "version": "1", "state": "READY"} in index


def test_unary_returns_prompt_and_completion(served):
    result = infer_text(served, "def main():", return_finish_reason=True, return_num_input_tokens=True,
                        return_num_output_tokens=True)
    text = result.as_numpy("text_output")[0].decode()
    assert text.startswith("def main():") and len(text) > len("def main():")
    assert result.as_numpy("finish_reason")[0] == b"length"
    assert result.as_numpy("num_output_tokens")[0] == 12
    assert result.as_numpy("num_input_tokens")[0] > 0
    excluded = infer_text(served, "def main():", exclude_input_in_output=True).as_numpy("text_output")[0].decode()
    assert text == "def main():" + excluded


def test_streaming_pieces_add_up_to_the_unary_text(served):
    whole = infer_text(served, "import sys", exclude_input_in_output=True).as_numpy("text_output")[0].decode()
    results = stream_request(served.client, "small", inputs("import sys", True, GREEDY, return_num_output_tokens=True))
    pieces = [r.as_numpy("text_output")[0].decode() for r in results]
    assert len(results) > 1, "a stream sends one response per piece"
    assert "".join(pieces) == whole
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in results) == 12
    flags = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
    assert flags == [False] * (len(results) - 1) + [True]


def test_stream_interval_sends_the_first_token_at_once_then_groups_of_tokens(served):
    whole = infer_text(served, "import os", exclude_input_in_output=True).as_numpy("text_output")[0].decode()
    results = stream_request(served.client, "small", inputs("import os", True, {**GREEDY, "stream_interval": 4},
                                                              return_num_output_tokens=True))
    counts = [int(r.as_numpy("num_output_tokens")[0]) for r in results]
    assert counts[0] == 1, "the first token is not held back"
    assert sum(counts) == 12 and all(c >= 4 for c in counts[1:-1]) and len(results) <= 4, counts
    assert "".join(r.as_numpy("text_output")[0].decode() for r in results) == whole


def test_empty_final_response_when_asked(served):
    results = stream_request(served.client, "small", inputs("class A:", True, GREEDY), empty_final=True)
    final = results[-1]
    assert final.get_response().parameters["triton_final_response"].bool_param
    assert final.as_numpy("text_output") is None, "the final response is empty"
    assert all(not r.get_response().parameters["triton_final_response"].bool_param for r in results[:-1])
    assert "".join(r.as_numpy("text_output")[0].decode() for r in results[:-1])


def test_bytes_contents_and_raw_contents_agree(served):
    """tritonclient sends raw_input_contents; other clients send contents.bytes_contents."""
    raw = infer_text(served, "for i in").as_numpy("text_output")[0]
    channel = grpc.insecure_channel(served.url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="small")
    t = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"for i in")
    p = request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    p.contents.bytes_contents.append(b'{"max_tokens": 12, "temperature": 0, "ignore_eos": true}')
    response = stub.ModelInfer(request, timeout=60)
    result = grpcclient.InferResult(response)
    assert result.as_numpy("text_output")[0] == raw
    channel.close()


def test_seeded_sampling_repeats(served):
    params = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234, "ignore_eos": True}
    a = infer_text(served, "x =", params).as_numpy("text_output")[0]
    b = infer_text(served, "x =", params).as_numpy("text_output")[0]
    c = infer_text(served, "x =", {**params, "seed": 99}).as_numpy("text_output")[0]
    assert a == b
    assert a != c


def test_stop_string_ends_and_is_not_returned(served):
    full = infer_text(served, "def f", {"max_tokens": 24, "temperature": 0, "ignore_eos": True},
                      exclude_input_in_output=True).as_numpy("text_output")[0].decode()
    stop = full[8:11]
    assert stop.strip(), "the model's output has a usable stop string"
    cut = infer_text(served, "def f", {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop]},
                     exclude_input_in_output=True, return_finish_reason=True)
    assert cut.as_numpy("text_output")[0].decode() == full[:full.index(stop)]
    assert cut.as_numpy("finish_reason")[0] == b"stop"


def expect_error(code, fn):
    with pytest.raises(InferenceServerException) as info:
        fn()
    assert info.value.status() == f"StatusCode.{code}", info.value.message()
    return info.value.message()


def test_sampling_settings_sent_as_request_parameters_apply(served):
    """tritonclient's `parameters=` (read by Triton's vLLM backend when no sampling_parameters
    tensor comes): max_tokens and the rest apply; a bad value gets INVALID_ARGUMENT naming it."""
    def generated(tensors, parameters):
        result = served.client.infer("small", tensors, parameters=parameters)
        return int(result.as_numpy("num_output_tokens")[0]), result.as_numpy("text_output")[0].decode()
    plain = inputs("x =", False, return_num_output_tokens=True, exclude_input_in_output=True)
    assert generated(plain, {"max_tokens": 5, "temperature": 0, "ignore_eos": True})[0] == 5
    # the same settings either way give the same greedy text
    assert generated(plain, {"max_tokens": 7, "temperature": 0, "ignore_eos": True}) == \
        generated(inputs("x =", False, {"max_tokens": 7, "temperature": 0, "ignore_eos": True},
                         return_num_output_tokens=True, exclude_input_in_output=True), None)
    msg = expect_error("INVALID_ARGUMENT", lambda: served.client.infer("small", plain, parameters={"max_tokens": 0}))
    assert "max_tokens" in msg


def test_error_status_codes(served):
    c = served.client
    msg = expect_error("INVALID_ARGUMENT", lambda: c.infer("missing", inputs("hi", False, GREEDY)))
    assert msg == "Request for unknown model: 'missing' is not found"
    msg = expect_error("NOT_FOUND", lambda: c.infer("small", inputs("hi", False, GREEDY), model_version="3"))
    assert "version 3" in msg
    # missing text_input
    stream_only = grpcclient.InferInput("stream", [1], "BOOL")
    stream_only.set_data_from_numpy(np.array([False]))
    assert "text_input" in expect_error("INVALID_ARGUMENT", lambda: c.infer("small", [stream_only]))
    # mistyped text_input
    typed = grpcclient.InferInput("text_input", [1], "INT32")
    typed.set_data_from_numpy(np.array([3], dtype=np.int32))
    assert "BYTES" in expect_error("INVALID_ARGUMENT", lambda: c.infer("small", [typed]))
    # misshaped text_input
    shaped = grpcclient.InferInput("text_input", [2], "BYTES")
    shaped.set_data_from_numpy(np.array([b"a", b"b"], dtype=object))
    assert "shape" in expect_error("INVALID_ARGUMENT", lambda: c.infer("small", [shaped]))
    # bad JSON
    bad = inputs("hi")
    js = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    js.set_data_from_numpy(np.array([b"{max_tokens: 3"], dtype=object))
    assert "JSON" in expect_error("INVALID_ARGUMENT", lambda: c.infer("small", bad + [js]))
    # out of range
    for params, word in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens")]:
        assert word in expect_error("INVALID_ARGUMENT", lambda: c.infer("small", inputs("hi", False, params)))
    # prompt longer than max_model_len (512)
    msg = expect_error("INVALID_ARGUMENT", lambda: c.infer("small", inputs("word " * 2000, False, GREEDY)))
    assert "max_model_len" in msg
    # load / unload outside explicit mode
    assert "explicit" in expect_error("UNAVAILABLE", lambda: c.load_model("small"))
    assert "explicit" in expect_error("UNAVAILABLE", lambda: c.unload_model("small"))
    # the server still serves
    assert infer_text(served, "ok").as_numpy("text_output") is not None


def test_stream_error_arrives_as_message_and_stream_goes_on(served):
    results: queue.Queue = queue.Queue()
    c = served.client
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        c.async_stream_infer("missing", inputs("hi", True, GREEDY))
        result, error = results.get(timeout=30)
        assert result is None and "unknown model" in str(error)
        c.async_stream_infer("small", inputs("hi", True, GREEDY))
        while True:
            result, error = results.get(timeout=60)
            assert error is None
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        c.stop_stream()


def test_stream_closes_with_status_when_client_asks(served):
    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(served.url)
    c.start_stream(callback=lambda result, error: results.put((result, error)), headers={"triton_grpc_error": "true"})
    c.async_stream_infer("small", inputs("hi", True, {"max_tokens": 0}))
    result, error = results.get(timeout=30)
    assert result is None
    assert isinstance(error, InferenceServerException) and error.status() == "StatusCode.INVALID_ARGUMENT"
    c.stop_stream()
    c.close()


def test_cancelled_stream_frees_the_engine(repo, demo_model):
    """A client that cancels its stream frees the request's blocks in the engine at once."""
    from pdserve_testing.harness import PdServer, add_model, config_text
    add_model(repo, "tiny", demo_model, config_text(max_model_len=2048))
    server = PdServer(repo).start()
    try:
        server.wait_ready("tiny")
        results: queue.Queue = queue.Queue()
        c = grpcclient.InferenceServerClient(server.url)
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        c.async_stream_infer("tiny", inputs("long", True, {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}))
        for _ in range(3):
            result, error = results.get(timeout=60)
            assert error is None
        server.wait_for(lambda: server.metric_value("pdserve_requests_running", model="tiny") == 1, "a running request", 10)
        c.stop_stream(cancel_requests=True)
        c.close()
        server.wait_for(lambda: server.metric_value("pdserve_requests_running", model="tiny") == 0
                        and server.metric_value("pdserve_kv_cache_usage_ratio", model="tiny") == 0,
                        "the engine to free the cancelled request", 15)
    finally:
        server.stop()


def test_generate_cli_streams_to_the_terminal(served):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "pdserve_clients.generate", "def f", "--url", served.url,
                          "--model", "small", "--max-tokens", "12", "--stats"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = infer_text(served, "def f", exclude_input_in_output=True).as_numpy("text_output")[0].decode()
    assert out.stdout == expected + "\n"
    assert "12 generated" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "pdserve_clients.generate", "x", "--url", served.url,
                          "--model", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "unknown model" in bad.stderr


def test_settings_messages_and_rpcs_are_tritons():
    """protos/grpc_service.proto declares the trace and log settings as Triton's proto does (names,
    numbers, types), so tritonclient's get/update_trace_settings and get/update_log_settings work.
    Our generated module is read in a child: it shares the package `inference` with tritonclient's."""
    import base64
    import subprocess
    import sys

    from google.protobuf import descriptor_pb2

    code = "import base64; from pdserve._proto import grpc_service_pb2 as pb; print(base64.b64encode(pb.DESCRIPTOR.serialized_pb).decode())"
    ours = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
    tritons = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(tritons)

    def wire(file: descriptor_pb2.FileDescriptorProto, name: str):
        """A message as the wire sees it: each field's number, name, type and label, message fields
        followed into their types (whose names do not travel)."""
        messages, todo = {}, [(f".{file.package}.{m.name}", m) for m in file.message_type]
        while todo:
            full, message = todo.pop()
            messages[full] = message
            todo += [(f"{full}.{n.name}", n) for n in message.nested_type]

        def shape(full):
            return sorted((f.number, f.name, f.type, f.label, f.HasField("oneof_index"),
                           shape(f.type_name) if f.type == f.TYPE_MESSAGE else None) for f in messages[full].field)
        return shape(f".inference.{name}")

    for name in ("TraceSettingRequest", "TraceSettingResponse", "LogSettingsRequest", "LogSettingsResponse"):
        assert wire(ours, name) == wire(tritons, name), name
    for file in (ours, tritons):
        methods = {m.name: (m.input_type, m.output_type) for s in file.service for m in s.method}
        assert methods["TraceSetting"] == (".inference.TraceSettingRequest", ".inference.TraceSettingResponse")
        assert methods["LogSettings"] == (".inference.LogSettingsRequest", ".inference.LogSettingsResponse")


def test_trace_and_log_settings_over_grpc(served):
    c = served.client
    assert c.get_trace_settings(as_json=True)["settings"]["trace_level"]["value"] == ["OFF"]
    updated = c.update_trace_settings(model_name="small", settings={"trace_rate": "5"}, as_json=True)["settings"]
    assert updated["trace_rate"]["value"] == ["5"] and updated["trace_level"]["value"] == ["OFF"]
    assert c.get_trace_settings(model_name="small", as_json=True)["settings"]["trace_rate"]["value"] == ["5"]
    assert c.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["1000"]   # global unchanged
    c.update_trace_settings(model_name="small", settings={"trace_rate": None})
    assert "unknown model" in expect_error("INVALID_ARGUMENT", lambda: c.get_trace_settings(model_name="missing"))
    logs = c.get_log_settings(as_json=True)["settings"]
    assert logs["log_format"]["string_param"] == "default" and logs["log_info"]["bool_param"] is True
    assert c.update_log_settings({"log_verbose_level": 1}, as_json=True)["settings"]["log_verbose_level"]["uint32_param"] == 1
    c.update_log_settings({"log_verbose_level": 0})
    assert "log_format" in expect_error("INVALID_ARGUMENT", lambda: c.update_log_settings({"log_format": "xml"}))

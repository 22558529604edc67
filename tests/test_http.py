"""The KServe v2 HTTP/REST door through the real tritonclient.http, Triton's generate extension
over plain HTTP, gRPC health through grpc_health's stubs, Triton's statistics, trace and log
settings, and TensorRT-LLM-style tensors, against a real server process."""
import json
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from pdserve_testing.harness import inputs

GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPT = "def main():"


@pytest.fixture(scope="module")
def http(served):
    client = httpclient.InferenceServerClient(served.http_url)
    yield client
    client.close()


def grpc_text(served, prompt=PROMPT, params=GREEDY, **flags):
    result = served.client.infer("small", inputs(prompt, False, params, **flags))
    return result.as_numpy("text_output")[0].decode()


def http_inputs(prompt, params, binary=True):
    text = httpclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object), binary_data=binary)
    sampling = httpclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=object), binary_data=binary)
    return [text, sampling]


def post(url, body, timeout=60):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_metadata_config_index(served, http):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("small") and http.is_model_ready("small", "1")
    assert not http.is_model_ready("small", "2") and not http.is_model_ready("missing")
    meta = http.get_server_metadata()
    assert meta["name"] == "pdserve" and "generate" in meta["extensions"]
    model = http.get_model_metadata("small")
    assert model["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in model["inputs"]}["text_input"] == "BYTES"
    config = http.get_model_config("small")
    assert config["name"] == "small" and config["model_transaction_policy"]["decoupled"] is True
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["parameters"]["max_model_len"]["string_value"] == "512"
    assert {"name": "small", "version": "1", "state": "READY", "reason": ""} in http.get_model_repository_index()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_text_equals_grpc(served, http, binary):
    expected = grpc_text(served)
    outputs = [httpclient.InferRequestedOutput("text_output", binary_data=binary),
               httpclient.InferRequestedOutput("finish_reason", binary_data=binary)]
    result = http.infer("small", http_inputs(PROMPT, GREEDY, binary), outputs=outputs)
    as_text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731 (JSON BYTES come back as str)
    assert as_text(result.as_numpy("text_output")[0]) == expected
    assert expected.startswith(PROMPT) and len(expected) > len(PROMPT)
    assert as_text(result.as_numpy("finish_reason")[0]) == "length"
    # no outputs named: tritonclient asks for every output in binary
    assert http.infer("small", http_inputs(PROMPT, GREEDY)).as_numpy("text_output")[0].decode() == expected


def test_generate_and_generate_stream_give_the_same_text(served):
    expected = grpc_text(served, exclude_input_in_output=True)
    base = f"http://{served.http_url}/v2/models/small"
    status, body = post(base + "/generate", {"text_input": PROMPT, "exclude_input_in_output": True,
                                             "parameters": {**GREEDY, "stream": False}})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["text_output"] == expected and answer["model_name"] == "small"
    status, body = post(base + "/generate_stream", {"text_input": PROMPT, "parameters": GREEDY})
    assert status == 200, body
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert len(events) > 1, "one event per piece"
    assert "".join(e["text_output"] for e in events) == expected


def test_infer_reads_request_parameters_as_grpc_does(served, http):
    """Sampling settings in the request's 'parameters' apply, as over gRPC."""
    text = httpclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    result = http.infer("small", [text], parameters={**GREEDY, "max_tokens": 6})
    assert result.as_numpy("text_output")[0].decode() == grpc_text(served, params={**GREEDY, "max_tokens": 6})
    status, body = post(f"http://{served.http_url}/v2/models/small/infer", {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}],
        "parameters": {"stop": ["\n"]}})
    assert status == 400 and "sampling_parameters" in body, body


def test_errors_as_triton_answers_them(served, http):
    with pytest.raises(InferenceServerException) as info:
        http.infer("missing", http_inputs(PROMPT, GREEDY))
    assert info.value.status() == "400"
    assert info.value.message() == "Request for unknown model: 'missing' is not found"
    with pytest.raises(InferenceServerException) as info:
        http.infer("small", http_inputs(PROMPT, {"temperature": -1}))
    assert info.value.status() == "400" and "temperature" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        http.infer("small", http_inputs(PROMPT, GREEDY), model_version="3")
    assert info.value.status() == "404" and "version 3" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        http.load_model("small")
    assert info.value.status() == "503" and "explicit" in info.value.message()
    base = f"http://{served.http_url}/v2/models"
    status, body = post(base + "/small/generate", {"text_input": PROMPT, "parameters": {"max_tokens": 0}})
    assert status == 400 and "max_tokens" in json.loads(body)["error"]
    status, body = post(base + "/missing/generate_stream", {"text_input": PROMPT})
    assert status == 400 and "unknown model" in json.loads(body)["error"]
    request = urllib.request.Request(base + "/small/infer", data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 400 and "JSON" in json.loads(info.value.read())["error"]


def test_grpc_health_check(served):
    channel = grpc.insecure_channel(served.url)
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
    assert stub.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10).status == serving
    assert stub.Check(health_pb2.HealthCheckRequest(service="small"), timeout=10).status == serving
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="missing"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()


def test_statistics_compute_infer_moves_with_requests(served, http):
    def stats():
        return served.client.get_inference_statistics("small", as_json=True)["model_stats"][0]["inference_stats"]
    before = stats()
    grpc_text(served)
    http.infer("small", http_inputs(PROMPT, GREEDY))
    after = stats()
    for part in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert int(after[part]["count"]) == int(before.get(part, {}).get("count", 0)) + 2, part
    assert int(after["compute_infer"]["ns"]) > int(before.get("compute_infer", {}).get("ns", 0))
    # the HTTP door reports the same figures, as JSON numbers
    http_stats = http.get_inference_statistics("small")["model_stats"][0]
    assert http_stats["version"] == "1" and http_stats["inference_stats"]["compute_infer"]["count"] >= 2


def test_trace_and_log_settings_answer(served, http):
    trace = served.client.get_trace_settings(as_json=True)["settings"]
    assert trace["trace_level"]["value"] == ["OFF"]
    assert http.get_trace_settings()["trace_level"] == ["OFF"]
    assert http.update_trace_settings(settings={"trace_rate": "10"})["trace_rate"] == ["10"]
    with pytest.raises(InferenceServerException) as info:
        served.client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "does not record request traces" in info.value.message()
    logs = served.client.get_log_settings(as_json=True)["settings"]
    assert logs["log_info"]["bool_param"] is True
    assert http.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
    assert served.client.update_log_settings({"log_verbose_level": 0}, as_json=True)["settings"]["log_info"]["bool_param"]
    with pytest.raises(InferenceServerException) as info:
        http.update_log_settings({"log_file": "/tmp/x.log"})
    assert info.value.status() == "400" and "log_file" in info.value.message()


def trtllm_inputs(prompt, **values):
    """The tensors of Triton's TensorRT-LLM ensemble, shaped [1, 1] as LangChain's and
    LlamaIndex's Triton integrations send them."""
    kinds = {"max_tokens": ("INT32", np.int32), "top_k": ("INT32", np.int32), "beam_width": ("INT32", np.int32),
             "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
             "repetition_penalty": ("FP32", np.float32), "length_penalty": ("FP32", np.float32),
             "random_seed": ("UINT64", np.uint64), "stream": ("BOOL", bool)}
    tensors = []
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    tensors.append(text)
    for name, value in values.items():
        if name in ("stop_words", "bad_words"):
            t = grpcclient.InferInput(name, [1, len(value)], "BYTES")
            t.set_data_from_numpy(np.array([[v.encode() for v in value]], dtype=object))
        else:
            datatype, np_type = kinds[name]
            t = grpcclient.InferInput(name, [1, 1], datatype)
            t.set_data_from_numpy(np.array([[value]], dtype=np_type))
        tensors.append(t)
    return tensors


def test_tensorrt_llm_style_tensors_give_the_same_greedy_text(served):
    expected = grpc_text(served, params={"max_tokens": 12, "temperature": 0})
    # LlamaIndex's defaults: top_k 1, top_p 0 (off), penalties 1.0, beam_width 1, bad and stop words empty
    tensors = trtllm_inputs(PROMPT, max_tokens=12, temperature=0.0, top_k=1, top_p=0.0, repetition_penalty=1.0,
                            length_penalty=1.0, beam_width=1, stream=False, bad_words=[""], stop_words=[""])
    assert served.client.infer("small", tensors).as_numpy("text_output")[0].decode() == expected
    with pytest.raises(InferenceServerException) as info:
        served.client.infer("small", trtllm_inputs(PROMPT, max_tokens=12, beam_width=4))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "beam_width" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        served.client.infer("small", trtllm_inputs(PROMPT, max_tokens=-3))
    assert "max_tokens" in info.value.message()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pdserve_clients.generate", *args], capture_output=True, text=True,
                          timeout=60)


def test_generate_cli_over_every_door(served):
    expected = grpc_text(served, exclude_input_in_output=True)
    for door in (["--url", served.url], ["--http", "--url", served.http_url],
                 ["--openai", "--url", f"127.0.0.1:{served.openai_port}"]):
        out = run_cli(PROMPT, *door, "--model", "small", "--max-tokens", "12", "--ignore-eos", "--stats")
        assert out.returncode == 0, (door, out.stderr)
        assert out.stdout == expected + "\n", door
        assert "12 generated" in out.stderr, door
        bad = run_cli("x", *door, "--model", "nope")
        assert bad.returncode == 1, door
        assert "unknown model" in bad.stderr.lower() or "does not exist" in bad.stderr, (door, bad.stderr)
        assert "None" not in bad.stderr and bad.stderr.startswith("error: "), bad.stderr
    assert "INVALID_ARGUMENT" in run_cli("x", "--url", served.url, "--model", "nope").stderr
    assert "--max-tokens N" in run_cli("--help").stdout

"""One bad request harms nobody else, nothing hangs without an error, the cluster view does not
trust dead things. Real processes, real etcd, tritonclient."""
import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pdserve_testing.harness import PdServer, add_model, config_text, free_port, inputs, is_running, thread_policies
from pdserve_testing.waits import wait_until

from pdserve.common.cluster_auth import signature
from pdserve.common.etcd import EtcdClient
from pdserve.common.etcd_server import EtcdProcess
from pdserve_clients import LLMClient

PD = (("PREFILL", "cpu"), ("DECODE", "cpu"))
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def node(tmp_path_factory, small_model):
    repo = str(tmp_path_factory.mktemp("rel-repo"))
    add_model(repo, "agg", small_model, config_text(max_model_len=512))
    add_model(repo, "pd", small_model, config_text(role_groups=PD, max_model_len=512))
    add_model(repo, "narrow", small_model, config_text(max_model_len=512, max_inflight_requests=2))
    token_file = tmp_path_factory.mktemp("secret") / "cluster.token"
    token_file.write_text(TOKEN)
    server = PdServer(repo, extra_args=["--cluster-token-file", str(token_file)]).start()
    for name in ("agg", "pd", "narrow"):
        server.wait_ready(name)
    yield server
    server.stop()


TOKEN = "0123456789abcdef-reliability-tests"


def signed(record: dict) -> bytes:
    """A record as the cluster's engines write it, signed with the node's secret."""
    return json.dumps({**record, "signature": signature(record, TOKEN)}).encode()


def text_of(server, model, prompt, params):
    result = server.client.infer(model, inputs(prompt, False, params, exclude_input_in_output=True))
    return result.as_numpy("text_output")[0].decode()


def error_of(fn) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return info.value


def stream_outcome(url, model, tensors, timeout=60, on_response=lambda: None):
    """('ok', text) or ('error', message) for one streamed request: never silence. on_response is
    called on the stream's thread as each response (not an error) arrives."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: (results.put((result, error)), error is None and on_response()))
    try:
        client.async_stream_infer(model, tensors)
        text = ""
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                return "error", str(error)
            out = result.as_numpy("text_output")
            text += out[0].decode() if out is not None else ""
            if result.get_response().parameters["triton_final_response"].bool_param:
                return "ok", text
    finally:
        client.stop_stream()
        client.close()


def put_record(endpoint: str, key: str, value: bytes, ttl: int = 60) -> None:
    async def put():
        client = EtcdClient([endpoint])
        try:
            await client.put(key, value, lease=await client.grant(ttl))
        finally:
            await client.close()
    asyncio.run(put())


def delete_key(endpoint: str, key: str) -> None:
    async def delete():
        client = EtcdClient([endpoint])
        try:
            await client.delete(key)
        finally:
            await client.close()
    asyncio.run(delete())


def test_a_poisoned_request_fails_alone(node):
    params = {**GREEDY, "max_tokens": 24}
    alone = text_of(node, "agg", "def main():", params)
    outcomes, threads = [], []

    def good():
        outcomes.append(text_of(node, "agg", "def main():", params))

    for _ in range(8):
        threads.append(threading.Thread(target=good))
        threads[-1].start()
    poisoned = {**GREEDY, "max_tokens": 24, "stop_token_ids": [10**6], "min_tokens": 1}
    err = error_of(lambda: node.client.infer("agg", inputs("def main():", False, poisoned)))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "outside the vocabulary" in err.message()
    for t in threads:
        t.join(timeout=60)
    assert outcomes == [alone] * 8


MALFORMED = {   # sampling_parameters as sent, each once broke a request's status or a stream
    "big-stop-id": '{"stop_token_ids": [4294967296]}',
    "5000-digits": '{"max_tokens": ' + "9" * 5000 + "}",
    "temperature-inf-in-float32": '{"temperature": 1e39}',
    "top-p-zero-in-float32": '{"top_p": 1e-50}',
    "1000-stops": json.dumps({"stop": ["x"] * 1000}),
    "deep-json": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_parameters_get_invalid_argument_and_a_stream_error(node, text):
    tensors = inputs("hi", False) + [grpcclient.InferInput("sampling_parameters", [1], "BYTES")]
    tensors[-1].set_data_from_numpy(np.array([text.encode()], dtype=object))
    err = error_of(lambda: node.client.infer("agg", tensors))
    assert err.status() == "StatusCode.INVALID_ARGUMENT", err
    stream_tensors = inputs("hi", True) + [tensors[-1]]
    kind, message = stream_outcome(node.url, "agg", stream_tensors)
    assert kind == "error" and "sampling_parameters" in message


def test_oversized_prompt_is_refused_at_the_front_end_naming_the_limit(node):
    err = error_of(lambda: node.client.infer("agg", inputs("a" * 20_000_000, False, GREEDY)))
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED" and "limit" in err.message()
    kind, message = stream_outcome(node.url, "agg", inputs("a" * 20_000_000, True, GREEDY))
    assert kind == "error" and "limit" in message


def test_past_the_admission_limit_requests_get_resource_exhausted_and_nothing_else_degrades(node):
    outcomes, threads = [], []

    def one():
        outcomes.append(stream_outcome(node.url, "narrow", inputs("def f(x):", True, {**GREEDY, "max_tokens": 200})))

    for _ in range(6):
        threads.append(threading.Thread(target=one))
        threads[-1].start()
    for t in threads:
        t.join(timeout=120)
    refused = [m for kind, m in outcomes if kind == "error"]
    assert 1 <= len(refused) <= 4 and all("max_inflight_requests" in m for m in refused), outcomes
    assert len([1 for kind, _ in outcomes if kind == "ok"]) >= 2
    assert node.metric_value("nv_inference_request_failure", model="narrow", reason="overloaded") == len(refused)
    assert text_of(node, "narrow", "x", {**GREEDY, "max_tokens": 4})          # served again
    assert text_of(node, "agg", "x", {**GREEDY, "max_tokens": 4})             # other models never noticed


def test_a_request_timeout_ends_it_and_frees_its_blocks(node):
    tensors = inputs("def f(x):", False, {**GREEDY, "max_tokens": 100_000})
    start = time.monotonic()
    # Triton's request timeout, µs: well inside the ~500 tokens max_model_len leaves, even on a fast CPU
    err = error_of(lambda: node.client.infer("agg", tensors, timeout=50_000))
    assert err.status() == "StatusCode.DEADLINE_EXCEEDED" and time.monotonic() - start < 10
    node.wait_for(lambda: node.metric_value("pdserve_kv_cache_usage_ratio", model="agg") == 0
                  and node.metric_value("pdserve_requests_running", model="agg") == 0,
                  "the timed-out request's blocks to be free", 15)


def test_a_stream_client_that_stops_reading_is_held_only_until_the_request_timeout(node):
    """A request has one response waiting to be written at a time (frontend/service.py), so a
    client that stops reading holds it; its `timeout` still ends it, with an error response."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    # a 1 KB HTTP/2 stream window: the server's writes block after a few responses
    channel = grpc.insecure_channel(node.url, options=[("grpc.http2.lookahead_bytes", 1024),
                                                       ("grpc.http2.bdp_probe", 0)])
    request = service_pb2.ModelInferRequest(model_name="agg", id="stalled")
    request.parameters["timeout"].int64_param = 2_000_000   # µs
    for name, datatype, value in (("text_input", "BYTES", b"def f(x):"), ("stream", "BOOL", True),
                                  ("sampling_parameters", "BYTES", json.dumps({**GREEDY, "max_tokens": 400}).encode())):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[1])
        (tensor.contents.bool_contents if datatype == "BOOL" else tensor.contents.bytes_contents).append(value)
    def deadline_failures():
        return node.metric_value("nv_inference_request_failure", model="agg", reason="deadline_exceeded") or 0
    failures = deadline_failures()
    try:
        responses = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                          request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                          response_deserializer=service_pb2.ModelStreamInferResponse.FromString)(
            iter([request]), timeout=60)
        assert next(responses).infer_response.id == "stalled"
        # not reading: the request ends at its timeout all the same
        started = time.monotonic()
        node.wait_for(lambda: node.metric_value("nv_inference_pending_request_count", model="agg") == 0,
                      "the unread request to end at its timeout", 15)
        assert time.monotonic() - started > 1.0   # it was held (the engine finishes well within the timeout)
        errors = [r.error_message for r in responses if r.error_message]
        assert errors and "deadline passed while its responses waited for the client" in errors[0]
        assert deadline_failures() == failures + 1   # counted as what the client was told
    finally:
        channel.close()
    assert text_of(node, "agg", "x =", {**GREEDY, "max_tokens": 4})


def test_only_the_engine_threads_compute_at_normal_priority(node):
    """--frontend-cpu-priority auto (the default) on a node of several engines: every front-end
    thread is SCHED_BATCH but the one that starts processes, so the private etcd runs at normal
    priority and so does each engine's engine thread; an engine's other threads (asyncio, gRPC,
    tokenizers) are SCHED_BATCH."""
    assert text_of(node, "agg", "hello", {**GREEDY, "max_tokens": 4})   # it serves, every engine has stepped
    assert "front end CPU priority: batch (engines on cpu, cpu, cpu, cpu)" in node.full_log()
    front_end = thread_policies(node.proc.pid)
    assert len([t for t, p in front_end.items() if p != os.SCHED_BATCH]) == 1, front_end   # the spawner
    children = subprocess.run(["pgrep", "-P", str(node.proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 4   # the private etcd and an engine per instance: agg, narrow, pd's two
    engines = 0
    for child in map(int, children):
        policies = thread_policies(child)
        if "pdserve.engine.worker" not in open(f"/proc/{child}/cmdline").read():
            assert set(policies.values()) == {os.SCHED_OTHER}, policies   # etcd
            continue
        engines += 1
        assert policies[child] == os.SCHED_BATCH, policies   # the main thread: asyncio and the engine RPC
        assert os.SCHED_OTHER in policies.values(), policies  # the engine thread
        assert set(policies.values()) == {os.SCHED_BATCH, os.SCHED_OTHER}, policies
    assert engines >= 3


def test_beside_one_engine_on_every_core_the_front_end_takes_only_idle_cpu(repo, small_model):
    """auto: a node that runs one engine, on device cpu, puts its front end at SCHED_IDLE once the
    model is loaded (that engine's OpenMP threads leave a core at every barrier); it serves."""
    add_model(repo, "one", small_model, config_text(max_model_len=512))
    server = PdServer(repo).start()
    try:
        server.wait_ready("one")
        server.wait_for(lambda: "front end CPU priority: idle" in server.full_log(), "the settled priority", 10)
        front_end = thread_policies(server.proc.pid)
        assert len([t for t, p in front_end.items() if p != os.SCHED_IDLE]) == 1, front_end   # the spawner
        assert text_of(server, "one", "hello", {**GREEDY, "max_tokens": 4})
    finally:
        server.stop()


def test_records_with_unknown_fields_are_read_and_bad_records_never_stop_the_view(node):
    endpoint = node.etcd_endpoint
    [real] = [r for r in node.engines("BOTH") if r["model"] == "agg"]
    copy = {**real, "instance_id": real["instance_id"] + "-copy", "field_of_a_newer_pdserve": {"x": 1}}
    key = f"/pdserve/default/engines/agg/{copy['instance_id']}"
    count = lambda: node.metric_value("pdserve_cluster_instances", model="agg", role="BOTH", state="ready")  # noqa: E731
    put_record(endpoint, key, signed(copy))
    node.wait_for(lambda: count() == 2, "the record with an unknown field in the view", 10)
    bad = {"/pdserve/default/engines/agg/garbage": b'{"instance_id": "only this"}',
           "/pdserve/default/engines/agg/not-json": b"\x00\x01"}
    try:
        for bad_key, value in bad.items():
            put_record(endpoint, bad_key, value)
        delete_key(endpoint, key)
        node.wait_for(lambda: count() == 1, "the view to go on after unreadable records", 10)
        assert text_of(node, "agg", "x", {**GREEDY, "max_tokens": 4})
    finally:
        for bad_key in bad:
            delete_key(endpoint, bad_key)


def test_a_dead_nodes_lingering_decode_record_costs_no_request(node):
    [real] = [r for r in node.engines("DECODE") if r["model"] == "pd"]
    ghost = {**real, "instance_id": "ghost-decode", "node": "dead-node:8001", "address": f"127.0.0.1:{free_port()}",
             "pid": 0}
    key = "/pdserve/default/engines/pd/ghost-decode"
    put_record(node.etcd_endpoint, key, signed(ghost))
    try:
        node.wait_for(lambda: node.metric_value("pdserve_cluster_instances", model="pd", role="DECODE") == 2,
                      "the ghost record in the view", 10)
        expected = text_of(node, "agg", "def g(y):", {**GREEDY, "max_tokens": 8})
        for _ in range(20):
            assert text_of(node, "pd", "def g(y):", {**GREEDY, "max_tokens": 8}) == expected
    finally:
        delete_key(node.etcd_endpoint, key)


def test_a_frozen_decode_engine_ends_its_streams_with_unavailable_and_is_restarted(repo, small_model):
    # streams long enough to be running when the engine freezes, however fast the CPU decodes
    add_model(repo, "pd", small_model, config_text(role_groups=PD, max_model_len=8192, kv_cache_blocks=1100))
    server = PdServer(repo).start()
    try:
        server.wait_ready("pd")
        outcomes, threads = [], []
        for i in range(2):
            threads.append(threading.Thread(target=lambda i=i: outcomes.append(
                stream_outcome(server.url, "pd", inputs(f"def f{i}(x):", True, {**GREEDY, "max_tokens": 8000}),
                               timeout=60) + (time.monotonic(),))))
            threads[-1].start()
        server.wait_for(lambda: server.metric_value("pdserve_requests_running", role="DECODE") == 2, "2 streams", 30)
        [decode] = server.engines("DECODE")
        frozen_at = time.monotonic()
        os.kill(decode["pid"], signal.SIGSTOP)
        for t in threads:
            t.join(timeout=60)
        assert [o[0] for o in outcomes] == ["error", "error"], (outcomes, server.log())
        assert all("UNAVAILABLE" in o[1] or "could not finish" in o[1] for o in outcomes), outcomes
        assert all(o[2] - frozen_at < 30 for o in outcomes), [o[2] - frozen_at for o in outcomes]
        server.wait_for(lambda: any(r["role"] == "DECODE" and r["state"] == "ready" and r["pid"] != decode["pid"]
                                    for r in server.engines()), "a restarted decode engine", 60)
        assert stream_outcome(server.url, "pd", inputs("def g(y):", True, {**GREEDY, "max_tokens": 8}))[0] == "ok"
    finally:
        server.stop()


def test_a_front_end_paused_past_the_stall_limit_does_not_kill_its_healthy_engines(repo, small_model, monkeypatch):
    """A stopped front end (SIGSTOP, a paused VM) polls no Stats; when it resumes, its last answers
    are old, but the engines are fine: it must not take them for frozen and kill them."""
    monkeypatch.setenv("PDSERVE_ENGINE_STALL_TIMEOUT", "3")
    add_model(repo, "agg", small_model, config_text())
    server = PdServer(repo).start()
    try:
        server.wait_ready("agg")
        [engine] = server.engines()
        os.kill(server.proc.pid, signal.SIGSTOP)
        time.sleep(6)   # the pause itself, twice the stall limit: nothing to wait for
        os.kill(server.proc.pid, signal.SIGCONT)
        assert stream_outcome(server.url, "agg", inputs("def g(y):", True, {**GREEDY, "max_tokens": 8}))[0] == "ok"
        server.wait_for(lambda: "stood still" in server.full_log(), "the front end to see its own pause", 10)
        # past the stall limit again, with fresh Stats answers: the engine is never taken for frozen
        server.holds(lambda: [r["pid"] for r in server.engines()] == [engine["pid"]]
                     and "looks frozen" not in server.full_log(), "the engine kept", 4)
    finally:
        server.stop()


def test_late_etcd_at_startup_still_reaches_ready(repo, small_model, tmp_path):
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd"))
    add_model(repo, "pd", small_model, config_text(role_groups=PD))
    server = PdServer(repo, extra_args=["--etcd-endpoints", etcd.endpoint]).start()
    try:
        server.wait_for(lambda: "not seen ready in etcd" in server.full_log(),
                        "the engines up, and unable to register while etcd is away", 60)
        etcd.start()
        server.wait_ready("pd", timeout=90)
        server.wait_for(lambda: sorted(r["role"] for r in server.engines()) == ["DECODE", "PREFILL"],
                        "both engines registered once etcd arrived", 60)
        server.wait_for(lambda: all(server.metric_value("pdserve_cluster_instances", model="pd", role=role,
                                                        state="ready") == 1 for role in ("PREFILL", "DECODE")),
                        "both engines ready in the front end's view", 30)
        client = LLMClient(server.url, "pd")
        try:
            assert client.stream_all("def h(z):", timeout=60, **GREEDY, max_tokens=6).num_output_tokens == 6
        finally:
            client.close()
    finally:
        server.stop()
        etcd.cleanup()


def test_kill_9_of_the_front_end_leaves_no_orphan(repo, small_model):
    add_model(repo, "agg", small_model, config_text())
    server = PdServer(repo).start()
    try:
        server.wait_ready("agg")
        port = server.etcd_endpoint.rsplit(":", 1)[1]
        children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 2   # the private etcd and the engine
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        wait_until(lambda: not any(map(is_running, children)), "the front end's children to end with it", 15,
                   detail=lambda: f"still running: {[p for p in children if is_running(p)]} (etcd port {port})")
    finally:
        server.stop()


def test_a_prefill_kill_loses_no_request_already_handed_off(repo, demo_model):
    add_model(repo, "pd", demo_model, config_text(role_groups=PD, max_model_len=2048, kv_cache_blocks=1024))
    add_model(repo, "agg", demo_model, config_text(max_model_len=2048, kv_cache_blocks=1024))
    server = PdServer(repo).start()
    try:
        server.wait_ready("pd")
        server.wait_ready("agg")
        prompts = [f"def handler_{i}(event, context):\n    " * 150 for i in range(4)]   # 1650 tokens each
        params = {**GREEDY, "max_tokens": 8}
        expected = [text_of(server, "agg", p, params) for p in prompts]
        [prefill] = server.engines("PREFILL")
        results = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, stream_outcome(server.url, "pd", inputs(prompts[i], True, params)))) for i in range(len(prompts))]
        for t in threads:
            t.start()
        server.wait_for(lambda: server.metric_value("pdserve_requests_waiting", role="PREFILL")
                        + server.metric_value("pdserve_requests_running", role="PREFILL") > 0,
                        "prefills in flight", 20)
        os.kill(prefill["pid"], signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        assert results == [("ok", e) for e in expected]
        server.wait_for(lambda: server.metric_value("pdserve_kv_cache_usage_ratio", model="pd", role="DECODE") == 0,
                        "the decode pool all free", 15)
    finally:
        server.stop()


def test_with_migration_limit_a_decode_kill_mid_stream_loses_no_stream(repo, demo_model):
    groups = (("PREFILL", "cpu"), ("DECODE", "cpu"), ("DECODE", "cpu"))
    add_model(repo, "pd", demo_model, config_text(role_groups=groups, max_model_len=1024, migration_limit=2))
    add_model(repo, "agg", demo_model, config_text(max_model_len=1024))
    server = PdServer(repo).start()
    try:
        server.wait_ready("pd")
        server.wait_ready("agg")
        params = {**GREEDY, "max_tokens": 300}
        prompts = [f"def handler_{i}(event):" for i in range(4)]
        expected = [text_of(server, "agg", p, params) for p in prompts]
        results = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, stream_outcome(server.url, "pd", inputs(prompts[i], True, params), timeout=120)))
            for i in range(len(prompts))]
        for t in threads:
            t.start()
        server.wait_for(lambda: server.metric_value("pdserve_requests_running", model="pd", role="DECODE") >= 3,
                        "streams decoding on both decode engines", 60)
        victim = server.engines("DECODE")[0]
        os.kill(victim["pid"], signal.SIGKILL)
        for t in threads:
            t.join(timeout=180)
        assert results == [("ok", e) for e in expected]
        assert server.metric_value("pdserve_request_migrations_total", model="pd") >= 1
    finally:
        server.stop()


def test_sigterm_with_streams_in_flight_ends_them_and_exits_0(repo, small_model):
    add_model(repo, "pd", small_model, config_text(role_groups=PD, max_model_len=1024))
    server = PdServer(repo).start()
    try:
        server.wait_ready("pd")
        outcomes = []
        # each stream's first response: it is in flight (1000 tokens of the small model last well under a
        # second, shorter than a metrics poll could be relied on to catch both running)
        first = [threading.Event() for _ in range(2)]
        threads = [threading.Thread(target=lambda i=i: outcomes.append(stream_outcome(
            server.url, "pd", inputs(f"def f{i}(x):", True, {**GREEDY, "max_tokens": 1000}), on_response=first[i].set)))
            for i in range(2)]
        for t in threads:
            t.start()
        server.wait_for(lambda: all(e.is_set() for e in first), "2 streams", 30)
        [decode] = server.engines("DECODE")
        os.kill(decode["pid"], signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert len(outcomes) == 2 and all(kind in ("ok", "error") for kind, _ in outcomes)
        server.wait_for(lambda: f"{decode['instance_id']} (pd DECODE) exited with code" in server.log(),
                        "the supervisor to see the engine exit", 30)
        assert f"{decode['instance_id']} (pd DECODE) exited with code 0" in server.log()
    finally:
        server.stop()


def test_engine_rpcs_and_records_without_the_cluster_secret_are_refused(node):
    import grpc
    from pdserve._proto import engine_pb2, engine_pb2_grpc
    [real] = [r for r in node.engines("BOTH") if r["model"] == "agg"]
    with grpc.insecure_channel(real["address"]) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        for call in (lambda md: stub.Stats(engine_pb2.StatsRequest(), metadata=md, timeout=10),
                     lambda md: list(stub.GenerateStream(iter([engine_pb2.StreamCommand(
                         generate=engine_pb2.GenerateRequest(request_id="x", prompt_token_ids=[1, 2]))]),
                                              metadata=md, timeout=10)),
                     lambda md: stub.SetState(engine_pb2.SetStateRequest(state="draining"), metadata=md, timeout=10)):
            for metadata in (None, (("pdserve-cluster-token", "guess-guess-guess"),)):
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Stats(engine_pb2.StatsRequest(), metadata=(("pdserve-cluster-token", TOKEN),), timeout=10)
    # a record written by someone without the secret attracts nothing
    fake = {**real, "instance_id": "intruder", "address": f"127.0.0.1:{free_port()}"}
    key = "/pdserve/default/engines/agg/intruder"
    count = lambda: node.metric_value("pdserve_cluster_instances", model="agg", role="BOTH")  # noqa: E731

    def refusals() -> int:
        return node.full_log().count("signature does not verify")

    for value in (json.dumps({**fake, "signature": ""}).encode(),
                  json.dumps({**fake, "signature": signature(fake, "not-the-cluster-secret")}).encode()):
        refused = refusals()
        put_record(node.etcd_endpoint, key, value)
        node.wait_for(lambda: refusals() > refused, "the front end to refuse the record", 15)
        assert count() == 1
        assert text_of(node, "agg", "x", {**GREEDY, "max_tokens": 4})
    delete_key(node.etcd_endpoint, key)


def test_after_an_etcd_outage_with_a_prefill_restart_every_new_request_succeeds(repo, small_model, tmp_path):
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd")).start()
    add_model(repo, "pd", small_model, config_text(role_groups=PD))
    server = PdServer(repo, extra_args=["--etcd-endpoints", etcd.endpoint]).start()
    try:
        server.wait_ready("pd")
        [prefill] = server.engines("PREFILL")
        etcd.stop()
        os.kill(prefill["pid"], signal.SIGKILL)   # restarted while etcd is away: its old record stays in etcd
        server.wait_for(lambda: f"{prefill['instance_id']} restarted as" in server.log(), "the prefill restart", 60)
        etcd.start()
        outcomes = [stream_outcome(server.url, "pd", inputs(f"def f{i}(x):", True, {**GREEDY, "max_tokens": 6}))
                    for i in range(20)]
        assert all(kind == "ok" for kind, _ in outcomes), outcomes
        server.wait_for(lambda: [r["instance_id"] for r in server.engines("PREFILL")] != [prefill["instance_id"]]
                        and prefill["instance_id"] not in [r["instance_id"] for r in server.engines()],
                        "the dead prefill engine's record gone from etcd", 60)
    finally:
        server.stop()
        etcd.cleanup()


@contextlib.asynccontextmanager
async def running_engine_loop(model: str, **config):
    """A real engine on its EngineLoop thread, driven from the running event loop as a worker's
    asyncio side drives it; stopped, and its thread joined, before the event loop closes."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.worker import EngineLoop

    engine = LLMEngine(EngineConfig(model_path=model, dtype="float32", kv_cache_blocks=256, max_model_len=1024,
                                    **config))
    engine_loop = EngineLoop(engine, asyncio.get_running_loop(), on_dispatch=lambda calls: None)
    engine_loop.start()
    try:
        yield engine_loop
    finally:
        engine_loop.stop()
        await asyncio.to_thread(engine_loop.thread.join, 60)


def test_work_after_a_long_idle_spell_is_not_taken_for_a_frozen_engine(small_model):
    """The supervisor kills an engine whose seconds_since_progress passes the stall limit while it
    holds requests. That figure counts from when work reaches an idle engine: it used to count
    from the engine's last step before it went quiet, so a burst after a minute of quiet was
    "no progress for 36 s" during its first step, and a healthy engine was killed."""
    from pdserve.engine.commands import AddRequest
    from pdserve.engine.sequence import SamplingParams

    idle_s = 1.5

    async def burst_after_idle() -> list[float]:
        async with running_engine_loop(small_model, max_num_batched_tokens=2048) as engine_loop:
            await asyncio.sleep(idle_s)
            sink: asyncio.Queue = asyncio.Queue()
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            for i in range(8):
                engine_loop.open(AddRequest(f"r{i}", tuple(range(3 + i, 3 + i + 200)), params), sink)
            seen, finished, end = [], 0, time.monotonic() + 60
            while finished < 8 and time.monotonic() < end:   # sampled as the Stats RPC would, all along
                seen.append(engine_loop.seconds_since_progress())
                try:
                    finished += sink.get_nowait().final
                except asyncio.QueueEmpty:
                    await asyncio.sleep(0.0005)
            assert finished == 8, "the burst did not finish within 60 s"
            return seen

    seen = asyncio.run(burst_after_idle())
    assert any(s > 0 for s in seen), "never sampled while the engine held the burst"
    assert max(seen) < idle_s, f"the engine's quiet {idle_s} s counted as a stall: {max(seen):.2f} s"


def test_a_long_prompt_step_shows_progress_layer_by_layer(small_model):
    """One step that computes a long prompt can outlast the stall limit on a slow CPU (a 4096-token
    float32 prefill of a 0.5B model did). seconds_since_progress counts from the last layer a
    forward finished, so such a step never reads as a stall. Layers are slowed here to stand in
    for that CPU: the step takes several times what any one layer does."""
    from pdserve.engine.commands import AddRequest
    from pdserve.engine.sequence import SamplingParams

    layer_s = 0.4

    def slowed(forward):
        def slow_forward(*args, **kwargs):
            time.sleep(layer_s)   # the slow CPU's layer
            return forward(*args, **kwargs)
        return slow_forward

    async def one_long_step() -> tuple[list[float], float]:
        async with running_engine_loop(small_model, max_num_batched_tokens=2048) as engine_loop:
            layers = engine_loop.engine.runner.model.model.layers
            for layer in layers:
                layer.forward = slowed(layer.forward)
            sink: asyncio.Queue = asyncio.Queue()
            started = time.monotonic()
            engine_loop.open(AddRequest("long", tuple(range(3, 1003)), SamplingParams(max_tokens=1, ignore_eos=True)),
                             sink)
            seen = []
            while not (out := sink.get_nowait() if not sink.empty() else None) or not out.final:
                assert time.monotonic() - started < 60, "the request did not finish within 60 s"
                seen.append(engine_loop.seconds_since_progress())
                await asyncio.sleep(0.002)
            return seen, time.monotonic() - started

    seen, took = asyncio.run(one_long_step())
    assert took >= 2 * layer_s and len(seen) > 10   # the small model's two layers, in one step
    assert max(seen) < 1.5 * layer_s, f"a {took:.2f} s step read as {max(seen):.2f} s without progress"


def _first_outputs_of_a_trickled_burst(model: str, admission_window_ms: float, first_gap_s: float = 0.004,
                                       announced: bool = False) -> list[int]:
    """An idle EngineLoop gets 6 requests 4 ms apart (the second first_gap_s after the first), as
    a front end forwards a burst, each announcing the ones after it when `announced`; the
    num_output_tokens of the first 6 outputs that come out."""
    from pdserve.engine.commands import AddRequest
    from pdserve.engine.sequence import SamplingParams

    async def trickle() -> list[int]:
        async with running_engine_loop(model, max_num_batched_tokens=4096,
                                       admission_window_ms=admission_window_ms) as engine_loop:
            sink: asyncio.Queue = asyncio.Queue()
            params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
            for i in range(6):
                engine_loop.open(AddRequest(f"r{i}", tuple(range(3 + i, 3 + i + 300)), params,
                                            admitting=5 - i if announced else 0), sink)
                await asyncio.sleep(first_gap_s if i == 0 else 0.004)
            outputs = [await asyncio.wait_for(sink.get(), 60) for _ in range(6)]
            finals = sum(out.final for out in outputs)
            while finals < 6:   # every request ends before the loop closes
                finals += (await asyncio.wait_for(sink.get(), 60)).final
            return [out.num_output_tokens for out in outputs]

    return asyncio.run(trickle())


def test_a_burst_reaching_an_idle_engine_shares_its_first_step(small_model):
    """A burst reaches the engine one request at a time (the front end forwards each in turn).
    An idle engine used to start its first step on the first request alone; the rest then waited
    for that step, and the first request had its second token before the others had their
    first. With the admission window (admission_window_ms) they share the first step."""
    assert _first_outputs_of_a_trickled_burst(small_model, 50) == [1] * 6
    # without the window the first step holds one request; 300 prompt tokens take it well past
    # the 4 ms spacing, so the next step both prefills the others and decodes the first
    assert 2 in _first_outputs_of_a_trickled_burst(small_model, 0)


def test_a_burst_its_front_end_announces_shares_the_first_step_past_a_quiet_window(small_model):
    """A front end admitting a burst (tokenizing, routing: on CPU it shares the cores) can fall
    quiet longer than the admission window, which ended the gathering: the first step then held
    the first request alone. Each request says how many more of its model version its front end
    was still admitting (GenerateRequest.admitting); an idle engine waits for those, up to ten
    windows."""
    assert _first_outputs_of_a_trickled_burst(small_model, 10, first_gap_s=0.03, announced=True) == [1] * 6
    assert 2 in _first_outputs_of_a_trickled_burst(small_model, 10, first_gap_s=0.03, announced=False)

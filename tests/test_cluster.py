"""Router-only nodes: a node with an empty repository serves, through KServe v2, every model the
other nodes of its cluster publish in etcd. Real processes, a shared etcd, tritonclient."""
import asyncio
import json
import signal
import time
import urllib.request

import pytest
from tritonclient.utils import InferenceServerException

from pdserve_testing.harness import PdServer, add_model, config_text, etcd_records, inputs

from pdserve.common.etcd import EtcdClient
from pdserve.common.etcd_server import EtcdProcess
from pdserve_clients import LLMClient

PD = (("PREFILL", "cpu"), ("DECODE", "cpu"))
GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
TOKEN = "router-only-cluster-secret-0123456789"


def put_key(endpoint: str, key: str, value: bytes) -> None:
    async def put():
        client = EtcdClient([endpoint])
        try:
            await client.put(key, value)
        finally:
            await client.close()
    asyncio.run(put())


def http_json(server: PdServer, path: str) -> dict:
    with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10) as reply:
        return json.loads(reply.read())


def http_generate(server: PdServer, prompt: str) -> str:
    body = json.dumps({"text_input": prompt, "exclude_input_in_output": True, "parameters": GREEDY}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/small/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())["text_output"]


def stream_text(server: PdServer, prompt: str) -> str:
    client = LLMClient(server.url, "small")
    try:
        return client.stream_all(prompt, timeout=60, **GREEDY).text
    finally:
        client.close()


def failure(server: PdServer) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        server.client.infer("small", inputs("abc", False, GREEDY), client_timeout=20)
    return info.value


def test_router_only_node_serves_the_models_other_nodes_publish(tmp_path, small_model):
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd")).start()
    token_file = tmp_path / "cluster.token"
    token_file.write_text(TOKEN)
    common = ["--etcd-endpoints", etcd.endpoint, "--cluster", "rt", "--cluster-token-file", str(token_file),
              "--lease-ttl", "4"]
    repo_a, repo_b = str(tmp_path / "a"), str(tmp_path / "b")
    add_model(repo_a, "small", small_model, config_text(role_groups=PD))
    (tmp_path / "b").mkdir()
    # node B: an empty repository, nothing to load: a router in front of node A's engines
    node_b = PdServer(repo_b, mode="none", extra_args=common + ["--node-name", "b"]).start()
    node_a = PdServer(repo_a, extra_args=common + ["--node-name", "a"]).start()
    try:
        # a model record without the cluster's secret attracts nothing
        forged = {"model": "intruder", "version": "1", "node": "x", "config": {"name": "intruder"}}
        put_key(etcd.endpoint, "/pdserve/rt/models/intruder/1/x", json.dumps(forged).encode())
        node_a.wait_ready("small")
        node_b.wait_for(lambda: node_b.client.is_model_ready("small"), "node B to serve node A's model", 30)

        [(key, record, lease)] = [r for r in etcd_records(etcd.endpoint, kind="models") if "intruder" not in r[0]]
        assert key == "/pdserve/rt/models/small/1/a" and lease != 0 and record["signature"]
        assert record["state"] == "READY" and record["config"]["name"] == "small"

        assert node_b.client.is_model_ready("small", "1") and node_b.client.is_server_ready()
        assert node_b.client.get_model_metadata("small", as_json=True) == \
            node_a.client.get_model_metadata("small", as_json=True)
        assert node_b.client.get_model_config("small", as_json=True) == \
            node_a.client.get_model_config("small", as_json=True)
        assert node_b.index() == {("small", "1"): ("READY", "")}
        assert not node_b.client.is_model_ready("intruder")
        assert http_json(node_b, "/v2/models/small/config") == http_json(node_a, "/v2/models/small/config")
        assert http_json(node_b, "/v2/models/small") == http_json(node_a, "/v2/models/small")

        prompt = "def fib(n):"
        expected = stream_text(node_a, prompt)
        assert expected and stream_text(node_b, prompt) == expected
        assert http_generate(node_b, prompt) == expected
        with pytest.raises(InferenceServerException) as info:
            node_b.client.infer("small", inputs("abc", False, GREEDY), model_version="7")
        assert info.value.status() == "StatusCode.NOT_FOUND" and "versions the cluster serves: 1" in str(info.value)

        # node A stops: its records go with it, and node B says so at once, never hangs
        node_a.stop()
        start = time.monotonic()
        node_b.wait_for(lambda: not node_b.client.is_model_ready("small"), "node B to see node A gone", 10)
        err = failure(node_b)
        assert err.status() == "StatusCode.UNAVAILABLE" and "no node of the cluster serves it now" in str(err), err
        assert time.monotonic() - start < 10
        assert node_b.index() == {("small", ""): ("UNAVAILABLE", "no node of the cluster serves it now "
                                                                  "(last published by node a)")}
        assert [k for k, _, _ in etcd_records(etcd.endpoint, kind="models")] == ["/pdserve/rt/models/intruder/1/x"]

        # node A comes back: served again; then it dies (kill -9): its records expire with the lease
        node_a = PdServer(repo_a, extra_args=common + ["--node-name", "a"]).start()
        node_b.wait_for(lambda: node_b.client.is_model_ready("small"), "node B to serve node A's model again", 60)
        assert stream_text(node_b, prompt) == expected
        node_a.proc.send_signal(signal.SIGKILL)
        node_a.proc.wait()
        start = time.monotonic()
        while time.monotonic() - start < 15:
            # bounded: a lingering record is routed around or reported, never waited on. Node A's
            # engines see their parent die and drain, so one may still answer in its last moments.
            try:
                node_b.client.infer("small", inputs("abc", False, GREEDY), client_timeout=20)
                err = None
            except InferenceServerException as exc:
                err = exc
                assert err.status() == "StatusCode.UNAVAILABLE", err
                if "no node of the cluster serves it now" in str(err):
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"node B still answers with node A's records 15 s after it died: {err}")
        assert not node_b.client.is_model_ready("small")
    finally:
        node_a.stop()
        node_b.stop()
        etcd.cleanup()


CHAT_TEMPLATE = ("{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<<assistant>>{% endif %}")


def test_router_only_node_tokenizes_routes_kv_aware_and_renders_the_model_s_template(tmp_path, small_model):
    """A router-only node reads the model's tokenizer files from etcd (node A publishes them with
    its model record): it renders the model's own chat template, refuses an oversized prompt
    itself, and routes a repeated prompt to the engine that caches it (kv_aware, the default)."""
    import shutil

    import openai
    weights = tmp_path / "weights"
    shutil.copytree(small_model, weights)
    tokenizer_config = json.loads((weights / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (weights / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (weights / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd")).start()
    common = ["--etcd-endpoints", etcd.endpoint, "--cluster", "kv", "--lease-ttl", "4"]
    repo_a, repo_b = str(tmp_path / "a"), str(tmp_path / "b")
    add_model(repo_a, "small", str(weights), config_text(role_groups=(("BOTH", "cpu"), ("BOTH", "cpu"))))
    (tmp_path / "b").mkdir()
    node_b = PdServer(repo_b, mode="none", extra_args=common + ["--node-name", "b"]).start()
    node_a = PdServer(repo_a, extra_args=common + ["--node-name", "a"]).start()
    try:
        node_a.wait_ready("small")
        node_b.wait_for(lambda: node_b.client.is_model_ready("small"), "node B to serve node A's model", 30)
        [(_, record, _)] = etcd_records(etcd.endpoint, kind="models")
        assert set(record["files"]) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}

        # the model's own template, not ChatML: node A's completion of the rendered prompt
        chat = openai.OpenAI(base_url=node_b.openai_url, api_key="none").chat.completions.create(
            model="small", messages=[{"role": "user", "content": "def fib(n):"}], max_tokens=8, temperature=0)
        plain = openai.OpenAI(base_url=node_a.openai_url, api_key="none").completions.create(
            model="small", prompt="<<user>> def fib(n):\n<<assistant>>", max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == plain.choices[0].text
        assert chat.usage.prompt_tokens == plain.usage.prompt_tokens

        # an oversized prompt is refused by node B's own tokenizer, at once
        start = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            node_b.client.infer("small", inputs("x = 1\n" * 100_000, False, GREEDY), client_timeout=20)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "bytes, more than max_model_len (512) tokens can hold" in str(info.value)
        assert time.monotonic() - start < 5

        # kv_aware: the same long prompt three times goes to the engine that holds it each time
        # (least load would take turns between the two idle engines)
        def queried() -> dict[str, float]:
            samples = node_a.metrics().get("pdserve_prefix_cache_queries", [])
            return {s.labels["instance"]: s.value for s in samples if s.name.endswith("_total")}
        looked_up = 2 * chat.usage.prompt_tokens   # the chat and the plain completion so far
        node_a.wait_for(lambda: sum(queried().values()) == looked_up, "engine stats on node A", 10)
        before = queried()
        prompt = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 6
        for _ in range(3):
            result = node_b.client.infer("small", inputs(prompt, False, {"max_tokens": 2, "temperature": 0},
                                                         return_num_input_tokens=True), client_timeout=60)
        n_prompt = int(result.as_numpy("num_input_tokens")[0])
        node_a.wait_for(lambda: sum(queried().values()) == looked_up + 3 * n_prompt, "engine stats on node A", 10)
        assert sorted(queried()[i] - before.get(i, 0) for i in queried()) == [0, 3 * n_prompt]
    finally:
        node_a.stop()
        node_b.stop()
        etcd.cleanup()

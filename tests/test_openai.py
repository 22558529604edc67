"""The OpenAI-compatible API through the real `openai` package against a real server process."""
import shutil

import openai
import pytest

from pdserve_testing.harness import PdServer, add_model, config_text, inputs, make_model

GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPT = "def main():"


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_model):
    """'small' (the 2-layer model) for the answers, 'tiny' (wider and slower: a 2000-token stream
    runs for many seconds) for the disconnect."""
    repo = tmp_path_factory.mktemp("openai-repo")
    add_model(str(repo), "small", small_model)
    slower = make_model(str(tmp_path_factory.mktemp("slower-model") / "weights"), layers=4, hidden=256,
                        intermediate=704, max_positions=2048)
    add_model(str(repo), "tiny", slower, config_text(max_model_len=2048))
    add_model(str(repo), "pd", small_model, config_text(role_groups=(("PREFILL", "cpu"), ("DECODE", "cpu"))))
    server = PdServer(str(repo)).start()
    for name in ("small", "tiny", "pd"):
        server.wait_ready(name)
    yield server
    server.stop()
    shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def grpc_text(server, prompt=PROMPT):
    result = server.client.infer("small", inputs(prompt, False, GREEDY, exclude_input_in_output=True))
    return result.as_numpy("text_output")[0].decode()


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert sorted(ids) == ["pd", "small", "tiny"]
    assert client.models.retrieve("small").owned_by == "pdserve"


def test_completion_equals_grpc_and_streams_the_same(server, client):
    expected = grpc_text(server)
    answer = client.completions.create(model="small", prompt=PROMPT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert answer.choices[0].text == expected
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model="small", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 1, "one event per piece"
    assert "".join(texts) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_pd_through_the_openai_door(server, client):
    """The OpenAI door takes the same router: a PD model's prompt is prefilled by its PREFILL engine."""
    transfers = server.metric_value("pdserve_kv_transfer_seconds_count", model="pd")
    answer = client.completions.create(model="pd", prompt=PROMPT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert answer.choices[0].text == grpc_text(server)
    server.wait_for(lambda: server.metric_value("pdserve_kv_transfer_seconds_count", model="pd") == transfers + 1,
                    "the KV handoff in the metrics", 5)


def test_chat_with_usage_and_template(server, client):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    answer = client.chat.completions.create(model="small", messages=messages, max_completion_tokens=10, temperature=0,
                                            seed=7, extra_body={"ignore_eos": True})
    message = answer.choices[0].message
    assert message.role == "assistant" and message.content
    assert answer.usage.completion_tokens == 10
    # the prompt is the chat template's rendering: its tokens outnumber the messages' words
    assert answer.usage.prompt_tokens > 6
    # the same prompt through gRPC (ChatML, as the small model's template writes it) gives the same text
    chatml = ("<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\nA loop, please.<|im_end|>\n"
              "<|im_start|>assistant\n")
    result = server.client.infer("small", inputs(chatml, False, {"max_tokens": 10, "temperature": 0, "ignore_eos": True},
                                                 exclude_input_in_output=True))
    assert message.content == result.as_numpy("text_output")[0].decode()
    stream = client.chat.completions.create(model="small", messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 10


def test_errors_in_openai_shape(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="missing", prompt="hi", max_tokens=4)
    assert info.value.status_code == 404 and "missing" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
    for bad, param in [({"temperature": -1}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
                       ({"top_p": 1.5}, "top_p"), ({"n": 17}, "n")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="small", prompt="hi", **bad)
        assert info.value.status_code == 400
        assert info.value.body["param"] == param and param in info.value.body["message"], info.value.body
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="small", messages=[])
    assert "messages" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:  # longer than max_model_len (512)
        client.completions.create(model="small", prompt="word " * 2000, max_tokens=4)
    assert "max_model_len" in info.value.message
    # the server goes on serving
    assert client.completions.create(model="small", prompt="ok", max_tokens=2).choices[0].text is not None


def test_disconnect_mid_stream_frees_the_engine(server):
    def running():
        return server.metric_value("pdserve_requests_running", model="tiny")
    cancelled = server.metric_value("nv_inference_request_failure", model="tiny", reason="cancelled")
    succeeded = server.metric_value("nv_inference_request_success", model="tiny")
    with openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60) as c:
        stream = c.completions.create(model="tiny", prompt="long", max_tokens=2000, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        server.wait_for(lambda: running() == 1, "a running request", 10)
        stream.close()   # the connection closes mid-stream
    server.wait_for(lambda: running() == 0 and server.metric_value("pdserve_kv_cache_usage_ratio", model="tiny") == 0,
                    "the engine to free the disconnected request", 15)
    server.wait_for(lambda: server.metric_value("nv_inference_request_failure", model="tiny", reason="cancelled")
                    == cancelled + 1, "the request to count as cancelled", 5)
    assert server.metric_value("nv_inference_request_success", model="tiny") == succeeded


def test_tokenize_detokenize_and_max_model_len(server, client):
    """vLLM's /tokenize and /detokenize give the token ids the engines get and their text back;
    the model cards say max_model_len."""
    import json
    import urllib.request

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(server.openai_url.removesuffix("/v1") + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())
    assert client.models.retrieve("tiny").model_extra["max_model_len"] == 2048
    assert {m.id: m.model_extra["max_model_len"] for m in client.models.list().data}["small"] == 512
    tokens = post("/tokenize", {"model": "small", "prompt": PROMPT})
    completion = client.completions.create(model="small", prompt=PROMPT, max_tokens=1, temperature=0)
    assert tokens["count"] == len(tokens["tokens"]) == completion.usage.prompt_tokens
    assert tokens["max_model_len"] == 512
    assert post("/detokenize", {"model": "small", "tokens": tokens["tokens"]}) == {"prompt": PROMPT}
    chat = post("/tokenize", {"model": "small", "messages": [{"role": "user", "content": "hi"}]})
    reply = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens
    with pytest.raises(urllib.error.HTTPError) as refused:
        post("/tokenize", {"model": "small"})
    assert refused.value.code == 400

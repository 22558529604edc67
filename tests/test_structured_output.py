"""Constrained decoding and tool calls through the real `openai` package and tritonclient against a
served small model with random weights: only constrained decoding can make its output parse.

The test schema bounds its strings (maxLength) and its array (maxItems) so that random weights
reach the end of the object within a modest max_tokens."""
import json

import openai
import pytest

from pdserve_testing.harness import inputs

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
MAX_TOKENS = 150


def valid_person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age", "tags"} and isinstance(value["name"], str) and len(value["name"]) <= 12
            and isinstance(value["age"], int) and 0 <= value["age"] <= 150 and isinstance(value["tags"], list)
            and len(value["tags"]) <= 3 and all(isinstance(t, str) and len(t) <= 8 for t in value["tags"]))


@pytest.fixture(scope="module")
def server(served):
    return served   # conftest's server of the small model as 'small'


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_parses_and_validates(client, temperature, stream):
    kwargs = dict(model="small", messages=MESSAGES, response_format=FORMAT, temperature=temperature, seed=5,
                  max_tokens=MAX_TOKENS)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert reason == ["stop"]
    else:
        answer = client.chat.completions.create(**kwargs)
        text = answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"
    assert valid_person(text), text


def test_json_object_parses(client, small_model):
    """Any object: nothing bounds a string's length, so a logit bias on the quote token makes these
    random weights close their strings soon; the grammar alone makes the output an object."""
    from transformers import AutoTokenizer
    quote = AutoTokenizer.from_pretrained(small_model).convert_tokens_to_ids('"')
    for seed in range(3):
        answer = client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=400, seed=seed,
                                                temperature=1.0, logit_bias={str(quote): 8},
                                                response_format={"type": "json_object"})
        text = answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop", text
        assert isinstance(json.loads(text), dict)


def test_structured_outputs_choice_and_regex(client):
    answer = client.completions.create(model="small", prompt="Pick:", max_tokens=20, temperature=1.0, seed=1,
                                       extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert answer.choices[0].text in ("red", "green", "blue")
    answer = client.completions.create(model="small", prompt="Code:", max_tokens=20, temperature=0.0,
                                       extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    assert len(answer.choices[0].text) == 6 and answer.choices[0].text[3] == "-"


def test_a_schema_the_engine_cannot_compile_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}})
    assert "structured output 'json' cannot be compiled" in caught.value.message and "bogus" in caught.value.message


def _check_weather_call(call):
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "days"} and isinstance(arguments["city"], str)
    assert isinstance(arguments["days"], int) and 1 <= arguments["days"] <= 7


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_required_or_named_returns_a_tool_call(client, tool_choice):
    answer = client.chat.completions.create(
        model="small", messages=[{"role": "user", "content": "Weather in Paris for 3 days?"}], tools=[WEATHER],
        tool_choice=tool_choice, max_tokens=MAX_TOKENS, temperature=1.0, seed=2)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_weather_call(call)


def test_tool_calls_stream_as_deltas(client):
    chunks = list(client.chat.completions.create(
        model="small", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], tool_choice="required",
        max_tokens=MAX_TOKENS, temperature=0.0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls and [tc.index for tc in calls] == list(range(len(calls)))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    for tc in calls:
        _check_weather_call(tc)


def test_tool_choice_refusals(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="small", messages=MESSAGES, tools=[WEATHER], max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "'tool_choice'" in caught.value.message and "nope" in caught.value.message


def test_kserve_sampling_parameters_json_schema(server):
    for temperature in (0.0, 1.0):
        settings = {"max_tokens": MAX_TOKENS, "temperature": temperature, "seed": 3,
                    "response_format": FORMAT}
        result = server.client.infer("small", inputs("A person as JSON: ", False, settings,
                                                     exclude_input_in_output=True))
        assert valid_person(result.as_numpy("text_output")[0].decode())
        settings = {"max_tokens": MAX_TOKENS, "temperature": temperature, "seed": 3,
                    "structured_outputs": {"json": SCHEMA}}
        result = server.client.infer("small", inputs("A person as JSON: ", False, settings,
                                                     exclude_input_in_output=True))
        assert valid_person(result.as_numpy("text_output")[0].decode())

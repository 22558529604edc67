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


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_call_arguments_stream_in_pieces(client, tool_choice):
    """As OpenAI streams them: a call's id and name first, then its arguments' text in deltas
    that join into the arguments the same request gives unstreamed."""
    kwargs = dict(model="small", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                  tool_choice=tool_choice, max_tokens=MAX_TOKENS, temperature=0.0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    calls = {}
    for tc in pieces:
        if tc.id:   # a call opens with its id and name, before any of its arguments
            assert tc.index not in calls and tc.function.name and not tc.function.arguments
            calls[tc.index] = {"name": tc.function.name, "arguments": ""}
        calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert sorted(calls) == list(range(len(whole)))
    assert len(pieces) > 2 * len(calls)
    for i, call in enumerate(whole):
        assert calls[i]["name"] == call.function.name
        assert json.loads(calls[i]["arguments"]) == json.loads(call.function.arguments)
        _check_weather_call(call)


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


@pytest.mark.parametrize("choice, text, content", [
    ("required", '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris {x}", "days": 2}}, '
                 '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}]', ""),
    ("function", '{"city": "Oslo", "days": 1}', ""),
    ("auto", 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}\n</tool_call>',
     "Let me look. "),
    ("auto", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}', ""),
    ("auto", "No call here, only a < sign and <tool", "No call here, only a < sign and <tool")])
def test_call_stream_joins_into_the_calls_parse_reads(choice, text, content):
    """Fed a few characters at a time, CallStream's deltas join into the content and calls that
    parse() reads from the whole text."""
    from pdserve.frontend.tool_calls import CallStream, ToolChoice, parse
    mode = ToolChoice("function", "get_weather") if choice == "function" else ToolChoice(choice)
    stream, deltas = CallStream((WEATHER,), mode), []
    for start in range(0, len(text), 3):
        deltas += stream.feed(text[start:start + 3])
    last, called = stream.finish()
    joined, calls = "", {}
    for delta in deltas + last:
        joined += delta.get("content", "")
        for tc in delta.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"name": tc["function"].get("name"), "arguments": ""})
            call["arguments"] += tc["function"]["arguments"]
    want_content, want_calls = parse(text, (WEATHER,), mode)
    assert joined == content and called == bool(want_calls)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want_calls]

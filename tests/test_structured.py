"""engine/structured.py on the small test model's tokenizer: grammars compile once per spec, a spec
that cannot compile is INVALID_ARGUMENT naming the kind, and masked sampling from random logits
(or a random-weight model, in this process) always gives output inside the grammar."""
import json
import re

import pytest
import torch

from pdserve.common.errors import Cause, ServeError
from pdserve.common.sampling import SamplingParams
from pdserve.engine.sequence import Sequence
from pdserve.engine.structured import Grammars, StructuredOutputs, choice_grammar

# Bounded lengths so that random logits end within a modest budget.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def valid_person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age", "tags"} and isinstance(value["name"], str)
            and isinstance(value["age"], int) and isinstance(value["tags"], list)
            and all(isinstance(t, str) for t in value["tags"]))


@pytest.fixture(scope="module")
def tokenizer(small_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(small_model)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def test_a_spec_compiles_once(grammars):
    spec = json.dumps(SCHEMA)
    first = grammars.compile("json", spec)
    size = grammars.compiler.get_cache_size_bytes()
    assert grammars.compile("json", spec) is not None and grammars.compiler.get_cache_size_bytes() == size
    assert first is not None


@pytest.mark.parametrize("kind, spec, part", [
    ("json", '{"type": "bogus"}', "bogus"),
    ("regex", "(", "parenthesis"),
    ("grammar", "root ::= missing", "missing"),
    ("nonsense", "", "unknown"),
])
def test_a_spec_that_cannot_compile_is_invalid_argument(grammars, kind, spec, part):
    with pytest.raises(ServeError) as caught:
        grammars.compile(kind, spec)
    assert caught.value.cause == Cause.INVALID_ARGUMENT
    assert f"'{kind}'" in caught.value.message and part in caught.value.message


def test_choice_grammar_quotes_each_string():
    assert choice_grammar(['a "b"', "c\nd"]) == 'root ::= "a \\"b\\"" | "c\\nd"'


def _masked_run(outputs: StructuredOutputs, params: SamplingParams, rows: int, vocab: int, seed: int,
                max_tokens: int = 400) -> list[list[int]]:
    """Random logits, masked, argmax; each row's tokens until its grammar ends."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [Sequence(f"r{i}", [1], params) for i in range(rows)] + [Sequence("free", [1], SamplingParams())]
    for seq in seqs[:rows]:
        outputs.start(seq.request_id, outputs.new_matcher(params))
    tokens: dict[str, list[int]] = {s.request_id: [] for s in seqs}
    live = list(seqs)
    for _ in range(max_tokens):
        constrained = [s for s in live if s.request_id in outputs.matchers]
        if not constrained:
            break
        outputs.begin_step(live)
        logits = torch.randn(len(live), vocab, generator=gen)
        outputs.apply(logits, live)
        outputs.end_step()
        chosen = logits.argmax(dim=-1).tolist()
        for seq, token in zip(list(live), chosen):
            tokens[seq.request_id].append(token)
            if outputs.accept(seq.request_id, token):
                outputs.forget(seq.request_id)
                live.remove(seq)
    assert not any(s.request_id in outputs.matchers for s in seqs), "a grammar did not end"
    return [tokens[s.request_id] for s in seqs[:rows]]


@pytest.mark.parametrize("overlap", [True, False])
def test_masked_random_logits_give_valid_json(tokenizer, overlap):
    outputs = StructuredOutputs(tokenizer, len(tokenizer), [tokenizer.eos_token_id], overlap=overlap)
    params = SamplingParams(structured_kind="json", structured_spec=json.dumps(SCHEMA))
    for tokens in _masked_run(outputs, params, rows=3, vocab=len(tokenizer), seed=1):
        assert tokens[-1] == tokenizer.eos_token_id
        assert valid_person(tokenizer.decode(tokens[:-1]))


@pytest.mark.parametrize("kind, spec, check", [
    ("regex", r"[a-z]{2,5}-\d{3}", lambda t: re.fullmatch(r"[a-z]{2,5}-\d{3}", t)),
    ("choice", json.dumps(["yes", "no", "maybe so"]), lambda t: t in ("yes", "no", "maybe so")),
    ("grammar", 'root ::= "(" [0-9] ("+" [0-9])? ")"', lambda t: re.fullmatch(r"\(\d(\+\d)?\)", t)),
    ("json_object", "", lambda t: isinstance(json.loads(t), dict)),
])
def test_each_kind_holds_random_logits_to_its_grammar(tokenizer, kind, spec, check):
    outputs = StructuredOutputs(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    params = SamplingParams(structured_kind=kind, structured_spec=spec)
    # json_object has no length bound: a few seeds, each must end and parse
    for tokens in _masked_run(outputs, params, rows=2, vocab=len(tokenizer), seed=3, max_tokens=2000):
        assert check(tokenizer.decode(tokens[:-1])), tokenizer.decode(tokens)


def test_a_resumed_request_continues_its_grammar(tokenizer):
    outputs = StructuredOutputs(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    params = SamplingParams(structured_kind="choice", structured_spec=json.dumps(["abcdef"]))
    prefix = tokenizer.encode("abc")
    outputs.start("r", outputs.new_matcher(params), prefix)
    seq = Sequence("r", [1], params)
    outputs.begin_step([seq])
    logits = torch.zeros(1, len(tokenizer))
    outputs.apply(logits, [seq])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all("abcdef".startswith("abc" + tokenizer.decode([t])) for t in allowed)


# ---- an engine in this process -------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(small_model):
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    return LLMEngine(EngineConfig(model_path=small_model, dtype="float32", kv_cache_blocks=256, max_model_len=512,
                                  max_num_seqs=8))


def test_engine_output_follows_the_schema_at_any_temperature(engine):
    prompt = engine.tokenizer.encode("A person as JSON: ")
    spec = json.dumps(SCHEMA)
    requests = {f"t{t}-{i}": SamplingParams(max_tokens=200, temperature=t, seed=i, structured_kind="json",
                                            structured_spec=spec)
                for t in (0.0, 1.0) for i in range(3)}
    requests["free"] = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for rid, params in requests.items():
        engine.add_request(rid, prompt, params)
    text = {rid: "" for rid in requests}
    reasons = {}
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            text[out.request_id] += out.text
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
    for rid in requests:
        if rid != "free":
            assert reasons[rid] == "stop" and valid_person(text[rid]), text[rid]
    assert not engine.structured.matchers and not engine.sequences


def test_engine_refuses_a_schema_it_cannot_compile(engine):
    with pytest.raises(ServeError) as caught:
        engine.add_request("bad", [1, 2], SamplingParams(structured_kind="json", structured_spec='{"type": 3}'))
    assert caught.value.cause == Cause.INVALID_ARGUMENT and "bad" not in engine.sequences


# ---- the doors' shape (frontend/protocol.py; the engine compiles) --------------------------------
from pdserve.frontend.protocol import ChatCompletionRequest, InvalidInput, SamplingParameters  # noqa: E402


def test_the_doors_take_response_format_and_structured_outputs():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    formats = {"json_schema": {"name": "person", "schema": SCHEMA}}
    params = ChatCompletionRequest.parse({**chat, "response_format": {"type": "json_schema", **formats}}).sampling_params()
    assert params.structured_kind == "json" and json.loads(params.structured_spec) == SCHEMA
    params = ChatCompletionRequest.parse({**chat, "response_format": {"type": "json_object"}}).sampling_params()
    assert (params.structured_kind, params.structured_spec) == ("json_object", "")
    for given, want in [({"json": SCHEMA}, ("json", json.dumps(SCHEMA, separators=(",", ":")))),
                        ({"json": json.dumps(SCHEMA)}, ("json", json.dumps(SCHEMA, separators=(",", ":")))),
                        ({"regex": "[a-z]+"}, ("regex", "[a-z]+")),
                        ({"choice": ["a", "b"]}, ("choice", '["a", "b"]')),
                        ({"grammar": 'root ::= "x"'}, ("grammar", 'root ::= "x"')),
                        ({"json_object": True}, ("json_object", ""))]:
        for doc in (given, json.dumps(given)):   # a KServe request parameter carries it as JSON text
            params = SamplingParameters.parse({"structured_outputs": doc}).sampling_params()
            assert (params.structured_kind, params.structured_spec) == want


@pytest.mark.parametrize("body, field, words", [
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"json": "{"}}, "structured_outputs", "not valid JSON"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
    ({"structured_outputs": {"whitespace": 1}}, "structured_outputs", "unknown key"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", '"schema"'),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format", "send one"),
])
def test_the_doors_refuse_a_malformed_constraint_naming_it(body, field, words):
    with pytest.raises(InvalidInput) as caught:
        SamplingParameters.parse(body, "sampling_parameters ")
    assert caught.value.param == field and words in caught.value.message
    assert caught.value.message.startswith(f"sampling_parameters '{field}'")


# ---- tool calls (frontend/tool_calls.py) ----------------------------------------------------------
from pdserve.frontend.tool_calls import ToolChoice, forced_schema, parse  # noqa: E402

TOOLS = ({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},)


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_tool_calls_read_from_hermes_then_llama3_text():
    content, calls = parse('Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', TOOLS,
                           ToolChoice("auto"))
    assert content == "Sure." and _calls(calls) == [("f", {"x": 1})]
    content, calls = parse('<|python_tag|>{"name": "f", "parameters": {"y": "z"}}', TOOLS, ToolChoice("auto"))
    assert content is None and _calls(calls) == [("f", {"y": "z"})]
    assert parse('{"name": "other", "arguments": {}}', TOOLS, ToolChoice("auto")) == (
        '{"name": "other", "arguments": {}}', [])
    assert parse("<tool_call>{}</tool_call>", TOOLS, ToolChoice("none")) == ("<tool_call>{}</tool_call>", [])


def test_required_and_named_tool_choice_are_constrained_and_read():
    schema = json.loads(forced_schema(TOOLS, ToolChoice("required")))
    assert schema["minItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["name"] == {"type": "string",
                                                                                                "enum": ["f"]}
    assert _calls(parse('[{"name": "f", "parameters": {"a": 1}}]', TOOLS, ToolChoice("required"))[1]) == [
        ("f", {"a": 1})]
    assert json.loads(forced_schema(TOOLS, ToolChoice("function", "f"))) == {"type": "object"}
    assert _calls(parse('{"a": 2}', TOOLS, ToolChoice("function", "f"))[1]) == [("f", {"a": 2})]
    assert forced_schema(TOOLS, ToolChoice("auto")) is None


def test_chat_requests_take_tools_and_tool_choice():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": list(TOOLS)}
    call = ChatCompletionRequest.parse(chat)
    assert call.tool_choice == ToolChoice("auto") and call.calls_tools and not call.sampling_params().structured_kind
    params = ChatCompletionRequest.parse({**chat, "tool_choice": "required"}).sampling_params()
    assert params.structured_kind == "json" and json.loads(params.structured_spec)["minItems"] == 1
    for bad, words in [({"tool_choice": {"type": "function", "function": {"name": "g"}}}, "not in 'tools'"),
                       ({"tools": [{"type": "function"}]}, "must be a list"),
                       ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "send one")]:
        with pytest.raises(InvalidInput) as caught:
            ChatCompletionRequest.parse({**chat, **bad})
        assert words in caught.value.message

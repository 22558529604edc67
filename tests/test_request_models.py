"""The request schemas of every door (frontend/protocol.py), without a server: what they accept,
what they refuse and how they say it, their defaults, and that the KServe and OpenAI doors turn
the same settings into the same SamplingParams."""
import dataclasses
import json

import pytest
from tritonclient.grpc import service_pb2 as pb   # pdserve's own KServe protos share its package: one per process

from pdserve.common.sampling import SamplingParams
from pdserve.frontend.protocol import (MAX_TOKENS_UNSET, ChatCompletionRequest, CompletionRequest, InvalidInput,
                                       SamplingParameters, TokenizeRequest, sibling_params)
from pdserve.frontend.tensors import parse_request, parse_sampling_parameters, serialize_bytes

SETTINGS = {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n\n", "END"],
            "stop_token_ids": [2, 5], "ignore_eos": True, "min_tokens": 2}
CHAT = [{"role": "user", "content": "hi"}]


def refusal(schema, data, prefix=""):
    with pytest.raises(InvalidInput) as info:
        schema.parse(data, prefix)
    return info.value


def test_the_fields_are_vllms_names_and_cover_sampling_params():
    # the output's grammar comes as vLLM's structured_outputs or OpenAI's response_format, and goes
    # to the engine as (structured_kind, structured_spec)
    door = tuple(f for f in SamplingParameters.model_fields if f not in ("structured_outputs", "response_format"))
    # bad_words go to the engine as their token ids, which the front end finds
    assert door == tuple(f.name for f in dataclasses.fields(SamplingParams)
                         if not f.name.startswith("structured_") and f.name != "bad_words_token_ids")
    for schema in (CompletionRequest, ChatCompletionRequest):
        assert set(SamplingParameters.model_fields) - set(schema.model_fields) == {"stream_interval"}


def test_defaults():
    assert SamplingParameters.parse({}).sampling_params() == SamplingParams()
    assert CompletionRequest.parse({"model": "m", "prompt": "p"}).sampling_params() == SamplingParams()
    chat = ChatCompletionRequest.parse({"model": "m", "messages": CHAT})
    assert chat.sampling_params() == SamplingParams(max_tokens=MAX_TOKENS_UNSET)   # until EOS, as vLLM
    assert (chat.stream, chat.stream_options.include_usage, chat.add_generation_prompt) == (False, False, True)


def test_valid_values_including_strings_as_triton_vllm_reads_them():
    sp = SamplingParameters.parse({"temperature": "0.5", "max_tokens": "7", "top_k": -1, "stop": "\n",
                                   "ignore_eos": "TRUE", "seed": 2.0, "stream_interval": "4"}).sampling_params()
    assert (sp.temperature, sp.max_tokens, sp.top_k, sp.stop, sp.ignore_eos, sp.seed, sp.stream_interval) == \
        (0.5, 7, 0, ("\n",), True, 2, 4)
    assert SamplingParameters.parse(SETTINGS).sampling_params() == SamplingParams(
        **{**SETTINGS, "stop": ("\n\n", "END"), "stop_token_ids": (2, 5)})


@pytest.mark.parametrize("field, value, words", [
    ("max_tokens", 0, "is 0; it must be >= 1"),
    ("max_tokens", 1.5, "is 1.5; it must be an integer"),
    ("max_tokens", 2**31, "it must be <= 2147483647"),
    ("max_tokens", True, "is True; it must be a number"),
    ("max_tokens", "seven", "is 'seven'; it must be an integer"),
    ("temperature", -1, "is -1; it must be >= 0.0"),
    ("temperature", 1e39, "it must be finite (at most 3.4e38)"),
    ("temperature", "warm", "it must be a number"),
    ("top_p", 0, "is 0; it must be > 0.0"),
    ("top_p", 1.5, "it must be <= 1.0"),
    ("top_p", 1e-50, "rounds to 0 in float32"),
    ("top_k", -2, "it must be >= -1"),
    ("seed", -1, "it must be >= 0"),
    ("seed", None, "is None; it must be a number"),
    ("stop", [1], "must be a non-empty string or a list of them"),
    ("stop", "", "must be a non-empty string or a list of them"),
    ("stop", ["x"] * 1000, "has 1000 strings of up to 1 characters; the limits are 64 strings"),
    ("stop_token_ids", [2**32], "must be a list of token ids"),
    ("stop_token_ids", [True], "must be a list of token ids"),
    ("stop_token_ids", list(range(2000)), "has 2000 ids; the limit is 1024"),
    ("ignore_eos", "maybe", "is 'maybe'; it must be true or false"),
    ("min_tokens", 99, "is 99; it must be <= 16"),
    ("min_tokens", -1, "it must be >= 0"),
    ("stream_interval", 0, "is 0; it must be >= 1"),
])
def test_each_invalid_field_is_refused_naming_it(field, value, words):
    error = refusal(SamplingParameters, {field: value}, "sampling_parameters ")
    assert error.message.startswith(f"sampling_parameters '{field}' ") and words in error.message, error.message
    assert error.param == field and error.cause.name == "INVALID_ARGUMENT"
    if field != "stream_interval" and value is not None:   # the OpenAI door (where null is "left out"): the same
        error = refusal(CompletionRequest, {"model": "m", "prompt": "p", field: value})   # words, without the prefix
        assert error.message.startswith(f"'{field}' ") and words in error.message and error.param == field


def test_a_huge_value_is_shown_in_part():
    error = refusal(SamplingParameters, {"temperature": 10**400})
    assert "finite" in error.message and len(error.message) < 200


def test_unknown_keys_refused_on_kserve_ignored_on_openai():
    error = refusal(SamplingParameters, {"beam": 2, "max_token": 5}, "sampling_parameters ")
    assert error.message.startswith("sampling_parameters has unknown key(s) ['beam', 'max_token']; supported: max_tokens")
    assert CompletionRequest.parse({"model": "m", "prompt": "p", "user": "u", "beam": 2}).sampling_params() == SamplingParams()


def test_openai_null_is_left_out_and_neutral_values_only():
    body = {"model": "m", "prompt": "p", "temperature": None, "n": 1, "presence_penalty": 0.0, "logprobs": None,
            "response_format": {"type": "text"}, "stream_options": None, "suffix": ""}
    assert CompletionRequest.parse(body).sampling_params() == SamplingParams()
    for field, value in [("suffix", "x"), ("tools", [{}]), ("use_beam_search", True)]:
        error = refusal(CompletionRequest, {"model": "m", "prompt": "p", field: value})
        assert error.param == field and "pdserve supports only" in error.message
    error = refusal(CompletionRequest, {"model": "m", "prompt": "p", "response_format": {"type": "xml"}})
    assert error.param == "response_format"
    assert refusal(CompletionRequest, {"model": "m", "prompt": "p", "stream_options": [1]}).param == "stream_options"


def test_completion_prompt_and_switches():
    call = CompletionRequest.parse({"model": "m", "prompt": ["one"], "echo": 1, "stream": "yes",
                                    "stream_options": {"include_usage": True}})
    assert (call.prompt, call.echo, call.stream, call.stream_options.include_usage) == ("one", True, True, True)
    for prompt in (None, ["a", "b"], [1, 2], 5):
        error = refusal(CompletionRequest, {"model": "m", "prompt": prompt})
        assert error.param == "prompt" and "token-id prompts" in error.message


def test_chat_messages():
    call = ChatCompletionRequest.parse({"model": "m", "add_generation_prompt": None, "messages": [
        {"role": "system", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "bo"}]})
    assert call.chat() == [{"role": "system", "content": ""}, {"role": "user", "content": "ab", "name": "bo"}]
    assert call.add_generation_prompt is True   # only false turns it off
    assert ChatCompletionRequest.parse({"model": "m", "messages": CHAT, "add_generation_prompt": False}) \
        .add_generation_prompt is False
    for messages, words in [(None, "'messages' must be a non-empty list"), ([], "'messages' must be a non-empty list"),
                            ([CHAT[0], "hi"], "messages[1] must be an object with a 'role'"),
                            ([{"content": "x"}], "messages[0] must be an object with a 'role'"),
                            ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content may hold only text")]:
        error = refusal(ChatCompletionRequest, {"model": "m", "messages": messages})
        assert error.param == "messages" and words in error.message, error.message


def test_special_tokens_are_added_to_a_prompt_but_not_to_a_chat_templates_text():
    """vLLM's defaults: a chat template writes BOS itself, so the tokenizer must not add another."""
    assert CompletionRequest.parse({"model": "m", "prompt": "x"}).add_special_tokens is True
    assert ChatCompletionRequest.parse({"model": "m", "messages": CHAT}).add_special_tokens is False
    assert ChatCompletionRequest.parse({"model": "m", "messages": CHAT, "add_special_tokens": True}).add_special_tokens
    assert TokenizeRequest.parse({"model": "m", "prompt": "x"}).add_special_tokens is True
    assert TokenizeRequest.parse({"model": "m", "messages": CHAT}).add_special_tokens is False


def test_chat_max_completion_tokens_supersedes_max_tokens():
    def sampling(**fields):
        return ChatCompletionRequest.parse({"model": "m", "messages": CHAT, **fields}).sampling_params()
    assert sampling(max_tokens=5).max_tokens == 5
    assert sampling(max_completion_tokens=4, max_tokens=0).max_tokens == 4   # max_tokens unread
    error = refusal(ChatCompletionRequest, {"model": "m", "messages": CHAT, "max_completion_tokens": 0})
    assert error.param == "max_completion_tokens" and error.message == "'max_completion_tokens' is 0; it must be >= 1"
    error = refusal(ChatCompletionRequest, {"model": "m", "messages": CHAT, "max_completion_tokens": 4, "min_tokens": 5})
    assert error.param == "min_tokens" and error.message == "'min_tokens' is 5; it must be <= 4"


def infer_request(sampling_json=None, parameters=None):
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(serialize_bytes([b"hi"]))
    if sampling_json is not None:
        request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(serialize_bytes([sampling_json.encode()]))
    for key, value in (parameters or {}).items():   # as tritonclient's `parameters=` sends them
        kind = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(request.parameters[key], kind, value)
    return request


def test_every_door_turns_the_same_settings_into_the_same_sampling_params():
    openai_completion = CompletionRequest.parse({"model": "m", "prompt": "hi", **SETTINGS}).sampling_params()
    openai_chat = ChatCompletionRequest.parse({"model": "m", "messages": CHAT, **SETTINGS}).sampling_params()
    kserve_json = parse_request(infer_request(json.dumps(SETTINGS))).sampling
    scalars = {k: v for k, v in SETTINGS.items() if not isinstance(v, list)}
    lists = {k: v for k, v in SETTINGS.items() if isinstance(v, list)}
    kserve_parameters = parse_request(infer_request(json.dumps(lists), scalars)).sampling
    assert openai_completion == openai_chat == kserve_json == kserve_parameters == parse_sampling_parameters(
        json.dumps(SETTINGS))


def test_kserve_request_parameters_are_validated_by_the_same_schema():
    with pytest.raises(InvalidInput, match="sampling_parameters 'max_tokens' is 0; it must be >= 1"):
        parse_request(infer_request(parameters={"max_tokens": 0}))
    with pytest.raises(InvalidInput, match="sampling_parameters is not valid JSON"):
        parse_request(infer_request("{max_tokens: 3"))


def test_generation_features_by_vllm_names_on_every_door():
    settings = {"presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": "1.2", "min_p": 0.1,
                "logit_bias": {"7": -100, "3": 2.5}, "n": 2, "best_of": 3, "seed": 4}
    want = dict(presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2, min_p=0.1,
                logit_bias=((3, 2.5), (7, -100.0)), n=2, best_of=3, seed=4)
    assert SamplingParameters.parse({**settings, "logprobs": 2, "prompt_logprobs": 1}).sampling_params() == \
        SamplingParams(**want, logprobs=2, prompt_logprobs=1)
    completion = CompletionRequest.parse({"model": "m", "prompt": "p", **settings, "logprobs": 2})
    assert completion.sampling_params() == SamplingParams(**want, logprobs=2)
    chat = ChatCompletionRequest.parse({"model": "m", "messages": CHAT, **settings, "logprobs": True,
                                        "top_logprobs": 3, "max_tokens": 9})
    assert chat.sampling_params() == SamplingParams(**want, logprobs=3, max_tokens=9)
    no_top = ChatCompletionRequest.parse({"model": "m", "messages": CHAT, "logprobs": True})
    assert no_top.sampling_params().logprobs == 0
    assert ChatCompletionRequest.parse({"model": "m", "messages": CHAT}).sampling_params().logprobs is None


def test_echo_scoring_asks_prompt_logprobs_and_one_token():
    call = CompletionRequest.parse({"model": "m", "prompt": "p", "echo": True, "logprobs": 1, "max_tokens": 0})
    params = call.sampling_params()
    assert (call.max_tokens, params.max_tokens, params.logprobs, params.prompt_logprobs) == (0, 1, 1, 1)
    assert refusal(CompletionRequest, {"model": "m", "prompt": "p", "max_tokens": 0}).param == "max_tokens"


@pytest.mark.parametrize("field, value, words", [
    ("presence_penalty", 2.5, "it must be <= 2.0"),
    ("repetition_penalty", 0, "it must be > 0.0"),
    ("min_p", 1.5, "it must be <= 1.0"),
    ("logprobs", 21, "it must be <= 20"),
    ("prompt_logprobs", -1, "it must be >= 0"),
    ("n", 0, "it must be >= 1"),
    ("n", 17, "it must be <= 16"),
    ("best_of", 1, "it must be >= n (2)"),
    ("logit_bias", {"x": 1}, "keys must be token ids"),
    ("logit_bias", {"1": 101}, "biases go from -100 to 100"),
    ("logit_bias", [1], "must be an object"),
])
def test_generation_feature_refusals(field, value, words):
    data = {field: value, **({"n": 2} if field == "best_of" else {})}
    error = refusal(SamplingParameters, data, "sampling_parameters ")
    assert words in error.message and error.param == field, error.message
    error = refusal(CompletionRequest, {"model": "m", "prompt": "p", **data})
    assert words in error.message and error.param == field, error.message


def test_chat_top_logprobs_needs_logprobs():
    error = refusal(ChatCompletionRequest, {"model": "m", "messages": CHAT, "top_logprobs": 2})
    assert error.param == "top_logprobs" and "logprobs" in error.message


def test_siblings_have_their_own_seeds_and_rank_by_logprobs():
    params = SamplingParams(seed=5, n=2, best_of=3, temperature=1.0)
    siblings = sibling_params(params)
    assert [s.seed for s in siblings] == [5, 6, 7] and all(s.logprobs == 0 for s in siblings)
    assert [s.seed for s in sibling_params(SamplingParams(n=2))] == [None, None]
    assert all(s.logprobs is None for s in sibling_params(SamplingParams(n=2)))

"""Log-probabilities, n/best_of, penalties and logit_bias through the real `openai` package and
tritonclient against a served small model (random weights, so only the definitions are checked:
against transformers' log-probabilities and the penalties' rules)."""
import json

import numpy as np
import openai
import pytest
import torch
import tritonclient.grpc as grpcclient

from pdserve_testing.harness import PdServer, add_model, config_text, inputs

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_model):
    """'small' on one engine and 'pd' on a prefill and a decode engine, both the small model."""
    repo = str(tmp_path_factory.mktemp("features-repo"))
    add_model(repo, "small", small_model)
    add_model(repo, "pd", small_model, config_text(role_groups=(("PREFILL", "cpu"), ("DECODE", "cpu"))))
    server = PdServer(repo).start()
    try:
        server.wait_ready("small")
        server.wait_ready("pd")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    answers = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)
    yield answers
    answers.close()


@pytest.fixture(scope="module")
def reference(small_model):
    """transformers' log-probabilities of the prompt's tokens (token 0 has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ids = AutoTokenizer.from_pretrained(small_model)(PROMPT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(small_model, torch_dtype=torch.float32)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return ids, [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


@pytest.mark.parametrize("model", ["small", "pd"])
def test_echo_scores_the_prompt_as_transformers(client, reference, model):
    """lm-evaluation-harness's scoring call; on PD the decode engine computes the prompt itself."""
    ids, want = reference
    answer = client.completions.create(model=model, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    choice = answer.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT and answer.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert np.allclose(lp.token_logprobs[1:], want, atol=0.05)
    assert "".join(lp.tokens) == PROMPT and lp.text_offset[0] == 0
    assert lp.text_offset[1:] == list(np.cumsum([len(t) for t in lp.tokens]))[:-1]
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])


def test_chat_top_logprobs_put_the_greedy_token_first(client):
    answer = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                                            extra_body={"ignore_eos": True})
    content = answer.choices[0].logprobs.content
    assert len(content) == 8
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6 and t.logprob <= 0
        assert t.bytes == list(t.token.encode("utf-8"))


def test_n_with_a_seed_is_reproducible(client):
    def ask():
        return client.completions.create(model="small", prompt=PROMPT, n=3, seed=11, temperature=1.0, max_tokens=10,
                                         extra_body={"ignore_eos": True})
    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices] and len(set(texts)) > 1
    assert first.usage.completion_tokens == 30
    streamed = {}
    for chunk in client.completions.create(model="small", prompt=PROMPT, n=3, seed=11, temperature=1.0,
                                           max_tokens=10, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == texts
    best = client.completions.create(model="small", prompt=PROMPT, n=1, best_of=3, seed=11, temperature=1.0,
                                     max_tokens=10, logprobs=0, extra_body={"ignore_eos": True})
    assert len(best.choices) == 1 and best.choices[0].text in texts


def _greedy(client, **settings):
    answer = client.completions.create(model="small", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=20,
                                       extra_body={"ignore_eos": True, **settings.pop("extra", {})}, **settings)
    return answer.choices[0]


def test_penalties_and_logit_bias_change_greedy_output_as_defined(client):
    plain = _greedy(client)
    # frequency and presence: each step's choice maximizes logprob - 2 * count - 1 * seen (of the output)
    penalized = _greedy(client, frequency_penalty=2.0, presence_penalty=1.0)
    lp = penalized.logprobs
    assert penalized.text != plain.text
    for i, token in enumerate(lp.tokens):
        earlier = lp.tokens[:i]
        if "\ufffd" in token:
            continue   # pieces of a character: several token ids share this text, so counts by text mislead

        def adjusted(text, logprob):
            count = earlier.count(text)
            return logprob - 2.0 * count - (1.0 if count else 0.0)
        best = max(adjusted(t, v) for t, v in lp.top_logprobs[i].items() if "\ufffd" not in t)
        assert adjusted(token, lp.token_logprobs[i]) >= best - 1e-3
    # logit_bias: a token pushed by 100 is chosen every time
    token_id = 17
    biased = _greedy(client, logit_bias={str(token_id): 100})
    assert len(set(biased.logprobs.tokens)) == 1 and biased.text == biased.logprobs.tokens[0] * 12
    # repetition (vLLM's): a token of the prompt or the output no longer wins
    repeated = _greedy(client, extra={"repetition_penalty": 100.0})
    assert repeated.text != plain.text


def test_kserve_sampling_parameters_give_the_openai_results(server, client):
    settings = {"n": 3, "seed": 11, "temperature": 1.0, "max_tokens": 10, "ignore_eos": True,
                "frequency_penalty": 0.5, "logprobs": 2}
    answer = client.completions.create(model="small", prompt=PROMPT, n=3, seed=11, temperature=1.0, max_tokens=10,
                                       frequency_penalty=0.5, logprobs=2, extra_body={"ignore_eos": True})
    tensors = inputs(PROMPT, False, settings, exclude_input_in_output=True, return_logprobs=True,
                     return_num_output_tokens=True)
    result = server.client.infer("small", tensors)
    texts = [t.decode() for t in result.as_numpy("text_output")]
    assert texts == [c.text for c in answer.choices]
    assert result.as_numpy("num_output_tokens").tolist() == [10, 10, 10]
    for raw, choice in zip(result.as_numpy("logprobs"), answer.choices):
        tokens = json.loads(raw)["tokens"]
        assert [t["token"] for t in tokens] == choice.logprobs.tokens
        assert np.allclose([t["logprob"] for t in tokens], choice.logprobs.token_logprobs, atol=1e-6)
        assert all(len(t["top_logprobs"]) == 2 for t in tokens)
    # streaming: each response's logprobs cover its tokens; the prompt's come with prompt_logprobs
    stream = inputs(PROMPT, True, {"max_tokens": 4, "temperature": 0, "ignore_eos": True, "prompt_logprobs": 0},
                    exclude_input_in_output=True, return_logprobs=True)
    pieces = _stream(server, stream)
    tokens = [t for p in pieces for t in p["tokens"]]
    prompt = [t for p in pieces for t in p["prompt_tokens"]]
    assert len(tokens) == 4 and prompt[0]["logprob"] is None and len(prompt) > 5


def _stream(server, tensors):
    results = []
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: results.append(error or result))
    client.async_stream_infer("small", tensors)
    client.stop_stream()
    client.close()
    assert not any(isinstance(r, Exception) for r in results), results
    return [json.loads(r.as_numpy("logprobs")[0]) for r in results if r.as_numpy("logprobs") is not None]


def test_refusals_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="small", prompt=PROMPT, n=2, best_of=3, stream=True)
    assert "best_of" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="small", prompt=PROMPT, logit_bias={"999999": 5})
    assert "logit_bias" in str(info.value)


def test_bad_words_ban_their_last_token_after_the_rest():
    """vLLM's rule, on the engine's token ids: a one-token word always, a longer one when the
    output ends with the tokens before its last."""
    from pdserve.common.sampling import SamplingParams
    from pdserve.engine.sampler import bad_word_bans
    from pdserve.engine.sequence import Sequence
    params = SamplingParams(bad_words_token_ids=((5,), (7, 8, 9)))
    seqs = [Sequence("a", [1], params, output_token_ids=[]), Sequence("b", [1], params, output_token_ids=[7, 8]),
            Sequence("c", [1], params, output_token_ids=[8, 7]), Sequence("d", [1], SamplingParams())]
    assert bad_word_bans(seqs) == [(0, 5), (1, 5), (1, 9), (2, 5)]


def test_bad_words_are_tokenized_as_vllm_does(small_model):
    """Each word as it starts a text, and after a space where that is another token sequence of the same length."""
    from tokenizers import Tokenizer
    from pdserve.frontend.prompts import bad_words_token_ids
    tok = Tokenizer.from_file(f"{small_model}/tokenizer.json")
    ids = bad_words_token_ids(tok, ("return", " self"))
    alone, spaced = tok.encode("return").ids, tok.encode(" return").ids
    assert ids[0] == tuple(alone)
    assert (tuple(spaced) in ids) == (len(spaced) == len(alone) and spaced[0] != alone[0])
    assert tuple(tok.encode("self").ids) in ids


def test_bad_words_change_greedy_output_on_both_doors(server, client):
    """Banning the greedy first token makes the best other alternative first, on the OpenAI and KServe doors."""
    plain = _greedy(client)
    first = plain.logprobs.tokens[0]
    word = first.strip()
    assert word, "the prompt's greedy continuation should start with a word"
    banned = _greedy(client, extra={"bad_words": [word]})
    assert banned.logprobs.tokens[0] not in (first, word, " " + word)
    top = plain.logprobs.top_logprobs[0]
    assert banned.logprobs.tokens[0] == max((t for t in top if t not in (word, " " + word)), key=top.get)
    settings = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "bad_words": [word]}
    result = server.client.infer("small", inputs(PROMPT, False, settings, exclude_input_in_output=True))
    assert result.as_numpy("text_output")[0].decode() == banned.text


def test_the_demo_model_scores_a_held_out_standard_library_file(demo_model, repo):
    """The served demo model (`make demo-model` trains it on the standard library) scored as
    lm-evaluation-harness scores (echo, logprobs, max_tokens 0) on files it was not trained on:
    a mean log-probability per token of at least -4.0 on each (random weights give about -9)."""
    import os
    import sys
    from transformers import AutoTokenizer
    from pdserve_testing.harness import ROOT
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from train_demo_model import HELD_OUT, STDLIB
    names = ("queue.py", "json/decoder.py")
    assert set(names) <= set(HELD_OUT)
    tokenizer = AutoTokenizer.from_pretrained(demo_model)

    def prompt(name: str) -> str:   # whole lines, within max_model_len 2048
        lines = (STDLIB / name).read_text().splitlines(keepends=True)
        while len(tokenizer("".join(lines))["input_ids"]) > 2000:
            lines = lines[:len(lines) * 9 // 10]
        return "".join(lines)

    add_model(repo, "demo", demo_model, config_text(max_model_len=2048))
    server = PdServer(repo).start()
    try:
        server.wait_ready("demo")
        with openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=300) as client:
            scored = {name: client.completions.create(model="demo", prompt=prompt(name), echo=True, logprobs=1,
                                                      max_tokens=0) for name in names}
    finally:
        server.stop()
    for name, completion in scored.items():
        logprobs = completion.choices[0].logprobs.token_logprobs[1:]
        assert len(logprobs) > 1000 and np.mean(logprobs) >= -4.0, (name, np.mean(logprobs))

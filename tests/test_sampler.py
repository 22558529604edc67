"""The sampler's math against plain torch references: vLLM's penalties, logit_bias, min_p,
log-probabilities as log_softmax of the raw logits, and the greedy fast path as argmax."""
import torch

from pdserve.common.sampling import SamplingParams
from pdserve.engine.sampler import Sampler, apply_min_p, apply_penalties, token_counts, top_k_top_p_sets, draw
from pdserve.engine.sequence import Sequence

VOCAB = 50


def _seq(prompt, output=(), **params) -> Sequence:
    seq = Sequence("r", list(prompt), SamplingParams(**params))
    seq.output_token_ids = list(output)
    return seq


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def _reference_penalties(logits, prompt, output, presence, frequency, repetition):
    """vLLM's definition, one row at a time."""
    out = logits.clone()
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return out


def test_token_counts():
    counts = token_counts([[1, 1, 3], []], 5, torch.device("cpu"))
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 0, 0, 0]]


def test_penalties_match_vllm_definition():
    logits = _logits(2)
    prompts, outputs = [[1, 2, 3], [4]], [[3, 3, 7], []]
    presence, frequency, repetition = [0.5, -0.3], [0.25, 1.0], [1.3, 0.8]
    got = apply_penalties(logits, prompts, outputs, torch.tensor(presence), torch.tensor(frequency),
                          torch.tensor(repetition))
    for r in range(2):
        want = _reference_penalties(logits[r], prompts[r], outputs[r], presence[r], frequency[r], repetition[r])
        torch.testing.assert_close(got[r], want)


def test_min_p_masks_below_fraction_of_top_probability():
    logits = _logits(1)
    probs = logits.softmax(-1)
    got = apply_min_p(logits, torch.tensor([0.2]))
    keep = probs >= 0.2 * probs.max()
    assert torch.equal(torch.isfinite(got), keep)
    torch.testing.assert_close(got[keep], logits[keep])


def test_greedy_fast_path_is_argmax_in_native_dtype():
    logits = _logits(4).to(torch.bfloat16)
    logits[1, 5] = logits[1, 9] = logits[1, 30] = logits[1].max() + 1   # tied maxima: the first wins
    seqs = [_seq([1], temperature=0.0) for _ in range(4)]
    got = Sampler(torch.device("cpu")).sample(logits.clone(), seqs, set())
    assert got == logits.float().argmax(-1).tolist() and got[1] == 5
    mixed = seqs[:3] + [_seq([1], temperature=0.0, presence_penalty=0.0, logprobs=0)]   # the float32 path
    assert Sampler(torch.device("cpu")).sample(logits.clone(), mixed, set()) == got


def test_logit_bias_and_penalties_change_greedy_choice():
    logits = _logits(3)
    top = logits.argmax(-1).tolist()
    seqs = [_seq([1], temperature=0.0, logit_bias=((5, 100.0),)),
            _seq([1], output=[top[1]], temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0),
            _seq([top[2]], temperature=0.0, repetition_penalty=100.0)]
    got = Sampler(torch.device("cpu")).sample(logits.clone(), seqs, set())
    assert got[0] == 5
    for r in (1, 2):
        want = _reference_penalties(logits[r], seqs[r].prompt_token_ids, seqs[r].output_token_ids,
                                    seqs[r].params.presence_penalty, seqs[r].params.frequency_penalty,
                                    seqs[r].params.repetition_penalty)
        assert got[r] == want.argmax().item() and got[r] != top[r]


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    logits = _logits(2)
    seqs = [_seq([1], temperature=0.0, logprobs=3), _seq([1], temperature=0.7, seed=4, logprobs=0)]
    tokens = Sampler(torch.device("cpu")).sample(logits.clone(), seqs, set())
    reference = logits.log_softmax(-1)
    first = seqs[0].new_logprobs
    assert first.token_id == tokens[0] == reference[0].argmax().item()
    assert abs(first.logprob - reference[0, tokens[0]].item()) < 1e-5
    want_lp, want_ids = reference[0].topk(3)
    assert [t for t, _ in first.top] == want_ids.tolist()
    torch.testing.assert_close(torch.tensor([p for _, p in first.top]), want_lp)
    second = seqs[1].new_logprobs
    assert second.token_id == tokens[1] and second.top == ()
    assert abs(second.logprob - reference[1, tokens[1]].item()) < 1e-5


def test_logprobs_ignore_bias():
    """Reported log-probabilities score the model: the bias moves the choice, not the numbers."""
    logits = _logits(1)
    seq = _seq([1], temperature=0.0, logprobs=1, logit_bias=((9, 50.0),))
    assert Sampler(torch.device("cpu")).sample(logits.clone(), [seq], set()) == [9]
    assert abs(seq.new_logprobs.logprob - logits.log_softmax(-1)[0, 9].item()) < 1e-5


def test_seeded_rows_are_reproducible_with_min_p():
    logits = _logits(1)
    draws = []
    for _ in range(2):
        seq = _seq([1], temperature=1.0, seed=7, min_p=0.05)
        sampler = Sampler(torch.device("cpu"))
        draws.append([sampler.sample(logits.clone(), [seq], set())[0] for _ in range(5)])
    assert draws[0] == draws[1]


def _reference_sets(logits, top_k, top_p):
    """Top-k then top-p by a full sort of each row: the set of token ids kept."""
    out = []
    for row, k, p in zip(logits, top_k, top_p):
        values, ids = row.sort(descending=True)
        values = values[:k] if k > 0 else values
        probs = values.softmax(-1)
        before = probs.cumsum(-1) - probs
        out.append(set(ids[:len(values)][before < p].tolist()))
    return out


def test_top_k_top_p_sets_equal_a_full_sort_of_the_vocabulary():
    """The sets are looked for among the largest logits first; flat rows, whose top-p set reaches
    past those, widen the search until the set ends: every row's set is the full sort's."""
    vocab = 5000
    gen = torch.Generator().manual_seed(3)
    peaked = torch.randn(4, vocab, generator=gen) * 4
    flat = torch.randn(3, vocab, generator=gen) * 0.05
    logits = torch.cat([peaked, flat])
    top_k = [0, 5, 300, 0, 0, 0, 2000]
    top_p = [0.9, 1.0, 0.95, 0.5, 0.9, 0.999, 0.7]
    values, ids = top_k_top_p_sets(logits, torch.tensor(top_k), torch.tensor(top_p))
    got = [set(i[torch.isfinite(v)].tolist()) for v, i in zip(values, ids)]
    assert got == _reference_sets(logits, top_k, top_p)
    assert len(got[5]) > 4000 and len(got[1]) == 5   # a flat row's set does reach far past the first candidates


def test_draw_is_the_inverse_of_the_whole_rows_cumulative_distribution():
    """draw() finds a chunk of the vocabulary, then the token in it: the same index as the first
    one whose cumulative probability over the whole row reaches the uniform number."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(400, 3000, generator=gen) * 3      # 3 chunks, the last one partial
    logits[:, 1500:1700] = float("-inf")                     # masked tokens are never drawn
    uniform = 1.0 - torch.rand(400, generator=gen)
    got = draw(logits, uniform)
    cdf = logits.double().softmax(-1).cumsum(-1)
    want = torch.searchsorted(cdf, uniform.double().unsqueeze(1)).squeeze(1)
    differ = got != want
    assert not ((got >= 1500) & (got < 1700)).any()
    assert differ.sum() <= 2 and all(abs(cdf[r, want[r]] - uniform[r]) < 1e-6 for r in differ.nonzero().flatten())


def test_sampled_tokens_follow_the_distribution_cut_by_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    rows = 40000
    for top_p, kept in ((1.0, 5), (0.8, 2)):
        seqs = [_seq([1], temperature=1.0, top_p=top_p) for _ in range(rows)]
        tokens = torch.tensor(Sampler(torch.device("cpu")).sample(logits.repeat(rows, 1), seqs, set()))
        want = logits[:kept].softmax(-1)
        freq = torch.bincount(tokens, minlength=5).float() / rows
        assert freq[kept:].sum() == 0, f"top_p {top_p}: a token outside the set was drawn"
        torch.testing.assert_close(freq[:kept], want, atol=0.01, rtol=0)


def test_prompt_logprobs_match_log_softmax():
    logits = _logits(5)
    targets = [3, 1, 4, 1, 5]
    got = Sampler(torch.device("cpu")).prompt_logprobs(logits, targets, [2] * 5)
    reference = logits.log_softmax(-1)
    for r, lp in enumerate(got):
        assert lp.token_id == targets[r] and abs(lp.logprob - reference[r, targets[r]].item()) < 1e-5
        assert [t for t, _ in lp.top] == reference[r].topk(2).indices.tolist()


# ---- an engine in this process -------------------------------------------------------------------
import pytest  # noqa: E402

from pdserve.engine.config import EngineConfig  # noqa: E402
from pdserve.engine.llm_engine import LLMEngine  # noqa: E402


@pytest.fixture(scope="module")
def f64_engine(small_model):
    """Prefix caching and chunked prefill on, with a small budget: prompts come in pieces."""
    return LLMEngine(EngineConfig(model_path=small_model, dtype="float64", kv_cache_blocks=128, max_model_len=256,
                                  kv_block_size=4, max_num_seqs=4, max_num_batched_tokens=8,
                                  enable_prefix_caching=True, enable_chunked_prefill=True))


def _run(engine, requests):
    outs = {rid: [] for rid, *_ in requests}
    for rid, tokens, params in requests:
        engine.add_request(rid, tokens, params)
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            outs[out.request_id].append(out)
    return outs


def test_engine_prompt_and_output_logprobs_equal_a_full_forward(f64_engine, small_model):
    from transformers import AutoModelForCausalLM
    tokens = f64_engine.tokenizer.encode("def add(a, b):\n    return a + b\n" * 2)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    warm = _run(f64_engine, [("warm", tokens, SamplingParams(max_tokens=1, temperature=0.0))])  # cache the prefix
    assert warm["warm"]
    outs = _run(f64_engine, [("a", tokens, params)])["a"]
    generated = [o.token_ids[0] for o in outs]
    model = AutoModelForCausalLM.from_pretrained(small_model, torch_dtype=torch.float64)
    with torch.no_grad():
        reference = model(torch.tensor([tokens + generated])).logits[0].log_softmax(-1)
    prompt_lp = outs[0].prompt_logprobs
    assert len(prompt_lp) == len(tokens) - 1 and all(not o.prompt_logprobs for o in outs[1:])
    for p, lp in enumerate(prompt_lp):
        assert lp.token_id == tokens[p + 1]
        assert abs(lp.logprob - reference[p, tokens[p + 1]].item()) < 1e-6
        assert [t for t, _ in lp.top] == reference[p].topk(2).indices.tolist()
    for i, out in enumerate(outs):
        (lp,) = out.logprobs
        row = reference[len(tokens) - 1 + i]
        assert lp.token_id == generated[i] == row.argmax().item() == lp.top[0][0]
        assert abs(lp.logprob - row[generated[i]].item()) < 1e-6
    assert not f64_engine.sequences

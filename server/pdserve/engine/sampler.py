"""Batched sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds,
penalties, logit bias, bad words, and the log-probabilities requests ask for.

A sampled row draws one uniform number per token and takes the token where it falls in the
cumulative distribution of the tokens it may choose (inverse transform): in descending order of
probability when top-k/top-p cut the row, in token order otherwise. Each seeded request draws
from its own generator, so a seed gives the same tokens whatever else shares the batch. Top-k
and top-p sets are looked for among each row's largest logits (torch.topk), widened only while a
row's set reaches past them: a full sort of the vocabulary, and a draw per vocabulary entry, cost
more than the decode step at a 150k vocabulary.

The order is vLLM's: min_tokens, bad_words and logit_bias, then the penalties, then temperature, min_p,
top-k and top-p. Log-probabilities are those of the model's raw logits (log_softmax before any
of these; vLLM's default `raw_logprobs`), so they score the model, not the request's settings.

A batch of plain greedy rows (no penalties, bias or log-probabilities) is one max over the
logits in the model's dtype, by the device's kernel set (its `argmax`): widening to float32
first would cost a copy of the whole [batch, vocab] block and change nothing, since every
bfloat16/float16 value is exact in float32 (both pick the first of tied maxima).
"""
from __future__ import annotations

import torch

from pdserve.common.sampling import TokenLogprobs
from pdserve.engine.kernels.reference import first_max_indices
from pdserve.engine.sequence import Sequence

PROMPT_LOGPROB_ROWS = 256   # prompt rows widened to float32 at a time (a row is a whole vocabulary)
TOP_CANDIDATES = 256        # the largest logits a top-k/top-p set is first looked for among (x8 until it fits)


def top_k_top_p_sets(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Each row's top-k and top-p set (top_k 0 and top_p 1 mean off) as (logits, token ids) in
    descending order, -inf past the set. Top-p's mass is over the top-k set when top-k is on,
    over the whole row otherwise; a token is dropped once the tokens before it hold top_p."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    # top-p's whole when top-k is off (a pass over the vocabulary: only when some row needs it)
    whole_row = torch.logsumexp(logits, dim=-1) if bool((top_k <= 0).any()) else None
    # every top-k set within the first candidates: its mass (top-p's whole) is then known
    width = min(vocab, max(TOP_CANDIDATES, int(top_k.max()) if len(top_k) else 0))
    while True:
        values, ids = logits.topk(width, dim=-1)
        mask = torch.arange(width, device=logits.device) >= k.unsqueeze(1)
        top_k_set = torch.logsumexp(values.masked_fill(mask, float("-inf")), dim=-1)
        mass = top_k_set if whole_row is None else torch.where(top_k > 0, top_k_set, whole_row)
        probs = (values - mass.unsqueeze(1)).exp().masked_fill(mask, 0.0)
        cumulative = probs.cumsum(dim=-1)
        mask |= cumulative - probs >= top_p.unsqueeze(1)
        # a row's set ends within the candidates: its top-k does, or its top-p mass is reached
        ends = (k <= width) | ((top_p < 1) & (cumulative[:, -1] >= top_p))
        if width == vocab or bool(ends.all()):
            return values.masked_fill(mask, float("-inf")), ids
        width = min(vocab, width * 8)


CDF_CHUNK = 1024   # draw() finds the chunk of the vocabulary first, then the token within it


def draw(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the index where uniform (in (0, 1]) falls in the cumulative distribution of
    softmax(logits): the first index whose cumulative probability reaches it. Chunk sums first,
    then one chunk's running sum, both in float64: a float64 running sum over a whole 150k
    vocabulary costs several times the rest of the draw."""
    rows, width = logits.shape
    chunk = min(CDF_CHUNK, width)
    chunks = -(-width // chunk)
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp().nan_to_num_(0.0)
    if chunks * chunk != width:
        weights = torch.nn.functional.pad(weights, (0, chunks * chunk - width))
    weights = weights.view(rows, chunks, chunk)
    chunk_cdf = weights.sum(dim=-1).double().cumsum_(dim=-1)
    target = uniform.double() * chunk_cdf[:, -1]
    c = torch.searchsorted(chunk_cdf, target.unsqueeze(1)).squeeze(1).clamp_(max=chunks - 1)
    before = torch.where(c > 0, chunk_cdf.gather(1, (c - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    inner = weights[torch.arange(rows, device=logits.device), c].double().cumsum_(dim=-1)
    # rounding between the chunk's sum and its running sum may leave the target past the end:
    # the last token of the chunk with weight is taken then
    inner_target = torch.minimum(target - before, inner[:, -1]).unsqueeze(1)
    i = torch.searchsorted(inner, inner_target).squeeze(1)
    return (c * chunk + i).clamp_(max=width - 1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks tokens whose probability is below min_p times the most likely token's (0: off)."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] how often each token occurs in each row's list."""
    ids = _padded(rows, vocab, device)     # padding lands in an extra column, dropped
    counts = torch.zeros((len(rows), vocab + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]],
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties on float logits [rows, vocab]: repetition over the prompt's and the
    output's tokens (divides a positive logit, multiplies a negative one), frequency by each
    token's count in the output, presence once per token the output holds."""
    vocab = logits.shape[-1]
    out_counts = token_counts(output_ids, vocab, logits.device)
    seen = (out_counts > 0) | (token_counts(prompt_ids, vocab, logits.device) > 0)
    rep = torch.where(seen, repetition.unsqueeze(1), torch.ones_like(logits))
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    return logits - frequency.unsqueeze(1) * out_counts - presence.unsqueeze(1) * (out_counts > 0).float()


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> list[TokenLogprobs]:
    """Each row's chosen token's log-probability and its num_top[row] most likely alternatives."""
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    k = max(num_top, default=0)
    top_lp, top_ids = (logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], chosen[:, None][:, :0]))
    top_lp, top_ids, chosen_ids = top_lp.tolist(), top_ids.tolist(), chosen.tolist()
    return [TokenLogprobs(chosen_ids[r], chosen_lp[r], tuple(zip(top_ids[r][:n], top_lp[r][:n])))
            for r, n in enumerate(num_top)]


def bad_word_bans(seqs: list[Sequence]) -> list[tuple[int, int]]:
    """(row, token) pairs that bad_words forbid now: a word's last token, where the output ends
    with the tokens before it (vLLM's rule; a one-token word always)."""
    bans = []
    for row, seq in enumerate(seqs):
        out = seq.output_token_ids
        for word in seq.params.bad_words_token_ids:
            prefix = list(word[:-1])
            if len(prefix) <= len(out) and out[len(out) - len(prefix):] == prefix:
                bans.append((row, word[-1]))
    return bans


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, argmax=None):
        self.device = device
        # greedy rows' tokens: the kernel set's argmax (engine/kernels/), torch's max by default
        self.argmax = argmax or first_max_indices
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)
        # Constrained decoding's hook (engine/structured.py): masks rows of the logits in place
        self.constrain = None

    def _tensor(self, values, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> list[int]:
        """The next token of each row. A row whose request asks log-probabilities gets them in
        its sequence's `new_logprobs` (read when the token is appended)."""
        if self.constrain is not None:
            self.constrain(logits, seqs)
        if all(seq.params.plain_greedy for seq in seqs):
            self._suppress_early_stops(logits, seqs, eos_ids)
            return self.argmax(logits).tolist()
        logits = logits.float()
        logprob_rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        raw_logprobs = logits[logprob_rows].log_softmax(dim=-1) if logprob_rows else None
        self._suppress_early_stops(logits, seqs, eos_ids)
        banned = bad_word_bans(seqs)
        if banned:
            rows, ids = zip(*banned)
            logits[self._tensor(rows, torch.long), self._tensor(ids, torch.long)] = float("-inf")
        logits = self._apply_bias_and_penalties(logits, seqs)
        sampled_rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        tokens = (self.argmax(logits) if len(sampled_rows) < len(seqs)
                  else torch.empty(len(seqs), dtype=torch.long, device=self.device))
        if sampled_rows:
            tokens[self._tensor(sampled_rows, torch.long)] = self._sample_rows(logits, seqs, sampled_rows)
        if raw_logprobs is not None:
            rows = self._tensor(logprob_rows, torch.long)
            found = top_logprobs(raw_logprobs, tokens[rows], [seqs[i].params.logprobs for i in logprob_rows])
            for i, lp in zip(logprob_rows, found):
                seqs[i].new_logprobs = lp
        return tokens.tolist()

    def _apply_bias_and_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        biased = [(i, t, b) for i, seq in enumerate(seqs) for t, b in seq.params.logit_bias]
        if biased:
            rows, ids, values = zip(*biased)
            logits.index_put_((self._tensor(rows, torch.long), self._tensor(ids, torch.long)), self._tensor(values),
                              accumulate=True)
        penalized = [i for i, seq in enumerate(seqs) if seq.params.penalized]
        if penalized:
            ps = [seqs[i] for i in penalized]
            rows = self._tensor(penalized, torch.long)
            logits[rows] = apply_penalties(
                logits[rows], [s.prompt_token_ids for s in ps], [s.output_token_ids for s in ps],
                self._tensor([s.params.presence_penalty for s in ps]),
                self._tensor([s.params.frequency_penalty for s in ps]),
                self._tensor([s.params.repetition_penalty for s in ps]))
        return logits

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence], sampled_rows: list[int]) -> torch.Tensor:
        params = [seqs[i].params for i in sampled_rows]
        sub = logits[self._tensor(sampled_rows, torch.long)] / self._tensor([p.temperature for p in params]).unsqueeze(1)
        if any(p.min_p > 0 for p in params):
            sub = apply_min_p(sub, self._tensor([p.min_p for p in params]))
        uniform = self._uniforms([seqs[i] for i in sampled_rows])
        tokens = torch.empty(len(sampled_rows), dtype=torch.long, device=self.device)
        cuts = [p.top_k > 0 or p.top_p < 1 for p in params]
        cut = [r for r, c in enumerate(cuts) if c]
        whole = [r for r, c in enumerate(cuts) if not c]
        if cut:
            rows = self._tensor(cut, torch.long)
            values, ids = top_k_top_p_sets(sub[rows], self._tensor([params[r].top_k for r in cut], torch.long),
                                           self._tensor([params[r].top_p for r in cut]))
            tokens[rows] = ids.gather(1, draw(values, uniform[rows]).unsqueeze(1)).squeeze(1)
        if whole:
            rows = self._tensor(whole, torch.long)
            tokens[rows] = draw(sub[rows], uniform[rows])
        return tokens

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One number in (0, 1] per row: a seeded request's from its own generator."""
        out = 1.0 - torch.rand(len(seqs), generator=self.default_generator, device=self.device)
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None:
                out[row] = 1.0 - torch.rand(1, generator=self._generator(seq), device=self.device)
        return out

    def prompt_logprobs(self, logits: torch.Tensor, targets: list[int], num_top: list[int]) -> list[TokenLogprobs]:
        """The log-probabilities of prompt tokens: row r of logits predicts targets[r]."""
        out: list[TokenLogprobs] = []
        for start in range(0, len(targets), PROMPT_LOGPROB_ROWS):
            end = start + PROMPT_LOGPROB_ROWS
            lp = logits[start:end].float().log_softmax(dim=-1)
            out += top_logprobs(lp, self._tensor(targets[start:end], torch.long), num_top[start:end])
        return out

    def skip_draw(self, seq: Sequence) -> None:
        """Advances a seeded request's generator past one token, drawn by another engine (PD),
        so the rest of its tokens match what one engine would have drawn."""
        if not seq.params.greedy and seq.params.seed is not None:
            torch.rand(1, generator=self._generator(seq), device=self.device)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.default_generator
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed)
        return seq.generator

    @staticmethod
    def _suppress_early_stops(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> None:
        """Below min_tokens, EOS and stop token ids cannot be chosen."""
        for row, seq in enumerate(seqs):
            if len(seq.output_token_ids) < seq.params.min_tokens:
                banned = list(set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else eos_ids))
                if banned:
                    logits[row, banned] = float("-inf")

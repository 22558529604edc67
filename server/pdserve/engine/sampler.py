"""Batched sampling on the device: greedy, temperature, top-k, top-p and per-request seeds.

Sampled rows use the exponential-race form of categorical sampling (argmax of p / E with
E ~ Exp(1)); each seeded request draws its noise from its own generator, so a seed gives
the same tokens whatever else shares the batch.
"""
from __future__ import annotations

import torch

from pdserve.engine.sequence import Sequence


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Masks logits outside each row's top-k and top-p sets (top_k 0 and top_p 1 mean off)."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    mask = ranks >= k
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    # Drop a token once the tokens ranked before it already hold top_p of the mass.
    cumulative_before = probs.cumsum(dim=-1) - probs
    mask |= cumulative_before >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> list[int]:
        logits = logits.float()
        self._suppress_early_stops(logits, seqs, eos_ids)
        greedy_tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if not sampled_rows:
            return greedy_tokens.tolist()
        rows = torch.tensor(sampled_rows, device=self.device)
        sub = logits[rows]
        temperature = torch.tensor([seqs[i].params.temperature for i in sampled_rows], device=self.device)
        top_k = torch.tensor([seqs[i].params.top_k for i in sampled_rows], device=self.device)
        top_p = torch.tensor([seqs[i].params.top_p for i in sampled_rows], device=self.device)
        sub = apply_top_k_top_p(sub / temperature.unsqueeze(1), top_k, top_p)
        probs = sub.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for row, i in enumerate(sampled_rows):
            noise[row].exponential_(generator=self._generator(seqs[i]))
        sampled = (probs / noise).argmax(dim=-1)
        greedy_tokens[rows] = sampled
        return greedy_tokens.tolist()

    def skip_draw(self, seq: Sequence, vocab_size: int) -> None:
        """Advances a seeded request's generator past one token, drawn by another engine (PD),
        so the rest of its tokens match what one engine would have drawn."""
        if not seq.params.greedy and seq.params.seed is not None:
            torch.empty(vocab_size, device=self.device).exponential_(generator=self._generator(seq))

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

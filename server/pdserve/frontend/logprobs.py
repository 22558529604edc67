"""The engine's per-token log-probabilities as OpenAI's `logprobs` objects.

The engine reports token ids with the log-probabilities of the model's raw logits
(engine/sampler.py); a token is shown as the text it decodes to on its own, as vLLM shows it
(a byte-level token that ends inside a UTF-8 character decodes to U+FFFD).

    completions: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: logprob}],
                  "text_offset": [...]}   (echo: the prompt's first token has null entries)
    chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
    KServe:      {"tokens": [{"token_id", "token", "logprob", "top_logprobs": [...]}], "prompt_tokens": [...]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

LOGPROB_FLOOR = -9999.0   # as vLLM: -inf is not JSON


@dataclass(frozen=True)
class Scored:
    """One token of a choice: its log-probability (None: the prompt's first token) and the
    alternatives the request asked for, most likely first."""
    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def scored(entries) -> list[Scored]:
    """engine_pb2.TokenLogprobs messages as Scored tokens."""
    return [Scored(e.token_id, e.logprob, tuple(zip(e.top_token_ids, e.top_logprobs))) for e in entries]


def prompt_scored(prompt_token_ids, entries) -> list[Scored]:
    """The prompt's tokens: the first without a log-probability, then the engine's entries."""
    return [Scored(prompt_token_ids[0], None)] + scored(entries) if prompt_token_ids else []


def _number(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class TokenTexts:
    """Token ids to the text each decodes to alone, decoded in one batch per call of load()."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer   # tokenizers.Tokenizer
        self.texts: dict[int, str] = {}

    def load(self, tokens: Iterable[Scored]) -> "TokenTexts":
        ids = {t.token_id for t in tokens} | {i for t in tokens for i, _ in t.top}
        missing = sorted(ids - self.texts.keys())
        if missing:
            decoded = self.tokenizer.decode_batch([[i] for i in missing], skip_special_tokens=False)
            self.texts.update(zip(missing, decoded))
        return self

    def __getitem__(self, token_id: int) -> str:
        return self.texts[token_id]


def completion_logprobs(tokens: list[Scored], texts: TokenTexts, offset: int) -> tuple[dict, int]:
    """The completions object of these tokens, whose text starts at `offset` of the choice's
    text; returns it and the offset after them. top_logprobs holds the chosen token too, as vLLM."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    texts.load(tokens)
    for t in tokens:
        text = texts[t.token_id]
        out["tokens"].append(text)
        out["token_logprobs"].append(None if t.logprob is None else _number(t.logprob))
        if t.logprob is None:
            out["top_logprobs"].append(None)
        else:
            top = {texts[i]: _number(lp) for i, lp in t.top}
            top.setdefault(text, _number(t.logprob))
            out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def _chat_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _number(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokens: list[Scored], texts: TokenTexts) -> dict:
    texts.load(tokens)
    return {"content": [{**_chat_entry(texts[t.token_id], t.logprob),
                         "top_logprobs": [_chat_entry(texts[i], lp) for i, lp in t.top]} for t in tokens]}


def cumulative_logprob(tokens: list[Scored]) -> float:
    """What ranks best_of's sequences."""
    return sum(t.logprob for t in tokens if t.logprob is not None)


def _kserve_entry(texts: TokenTexts, token_id: int, logprob: float | None) -> dict:
    return {"token_id": token_id, "token": texts[token_id], "logprob": None if logprob is None else _number(logprob)}


def kserve_logprobs(tokens: list[Scored], prompt: list[Scored], texts: TokenTexts) -> str:
    """The KServe doors' `logprobs` output of one sequence, a JSON text: its tokens (and, when
    asked, the prompt's) with ids, texts, log-probabilities and top alternatives."""
    texts.load(prompt + tokens)

    def entries(items: list[Scored]) -> list[dict]:
        return [{**_kserve_entry(texts, t.token_id, t.logprob),
                 "top_logprobs": [_kserve_entry(texts, i, lp) for i, lp in t.top]} for t in items]
    return json.dumps({"tokens": entries(tokens), "prompt_tokens": entries(prompt)})

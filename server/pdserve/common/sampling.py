"""Sampling parameters of one request: defined once, with the defaults of Triton's vLLM backend
(vLLM's SamplingParams: 16 tokens, temperature 1.0), and their form on the engine RPC; and the
log-probabilities an engine reports for a token."""
from __future__ import annotations

from dataclasses import dataclass

from pdserve._proto import engine_pb2

MAX_LOGPROBS = 20   # top alternatives per token, as OpenAI's top_logprobs limit


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0: all tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    # As vLLM defines them: presence and frequency count the generated tokens, repetition the
    # prompt's and the generated ones (a logit > 0 is divided by it, one < 0 multiplied).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit)
    min_p: float = 0.0
    # vLLM's bad_words: the words (read by the front end), then their token sequences (the
    # front end tokenizes them; the engine bans each one's last token after the rest of it)
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # Log-probabilities: None: none; k: the chosen token's and the k most likely alternatives'
    # (0: the chosen token's only). prompt_logprobs: the same for every prompt token but the first.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Constrained decoding (engine/structured.py): "" or json, json_object, regex, choice, grammar,
    # and its spec (a JSON schema, a regex, a JSON list of strings, an EBNF grammar).
    structured_kind: str = ""
    structured_spec: str = ""
    # Read by the front end only (not sent to the engine): how many sequences to generate
    # (best_of) and return (n), each its own engine request, and streaming's tokens per response
    # after the first (raises the model's `stream_interval`, as vLLM's per-request setting does).
    n: int = 1
    best_of: int | None = None
    stream_interval: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def prefilled_where_decoded(self) -> bool:
        """Whether the engine that decodes the request must also compute its prompt: it reports
        log-probabilities of the logits it computes, or constrains the first token by a grammar."""
        return self.logprobs is not None or self.prompt_logprobs is not None or bool(self.structured_kind)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes or reports the logits: argmax alone picks the token."""
        return (self.greedy and not self.penalized and not self.logit_bias and self.logprobs is None
                and not self.bad_words_token_ids)

    def to_proto(self) -> engine_pb2.SamplingParams:
        return engine_pb2.SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            has_seed=self.seed is not None, seed=self.seed or 0, stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias), min_p=self.min_p,
            logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
            structured_kind=self.structured_kind, structured_spec=self.structured_spec,
            bad_words=[engine_pb2.TokenIds(ids=ids) for ids in self.bad_words_token_ids])

    @classmethod
    def from_proto(cls, msg: engine_pb2.SamplingParams) -> "SamplingParams":
        return cls(max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k,
                   seed=msg.seed if msg.has_seed else None, stop=tuple(msg.stop),
                   stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos, min_tokens=msg.min_tokens,
                   presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
                   repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
                   logit_bias=tuple(sorted(msg.logit_bias.items())), min_p=msg.min_p,
                   logprobs=msg.logprobs if msg.HasField("logprobs") else None,
                   prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
                   structured_kind=msg.structured_kind, structured_spec=msg.structured_spec,
                   bad_words_token_ids=tuple(tuple(w.ids) for w in msg.bad_words))


@dataclass(frozen=True)
class TokenLogprobs:
    """One token's log-probability and its most likely alternatives, most likely first."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_proto(self) -> engine_pb2.TokenLogprobs:
        return engine_pb2.TokenLogprobs(token_id=self.token_id, logprob=self.logprob,
                                        top_token_ids=[t for t, _ in self.top], top_logprobs=[p for _, p in self.top])

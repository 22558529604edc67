"""Constrained decoding (OpenAI's response_format, vLLM's structured_outputs): each constrained
request's output stays inside a grammar, whatever the weights say.

A request names a kind and a spec (common/sampling.py): `json` (a JSON schema), `json_object`,
`regex`, `choice` (a JSON list of strings) or `grammar` (EBNF, as xgrammar and vLLM read it).
xgrammar compiles each (kind, spec) once against the engine's tokenizer (its compiler caches the
compiled grammar), and a matcher per request follows the tokens: before each sampling step it
fills the request's row of a token bitmask, the sampler's hook masks the logits with it, and each
sampled token is accepted, the request ending when the matcher terminates (after a stop token).

The masks of a step depend only on the tokens accepted before it, so they are filled on a helper
thread while the model computes the step's logits (begin_step) and waited for just before
sampling (apply); xgrammar's fill runs in C++, beside torch's kernels.

JSON is generated compact (no free whitespace between tokens): with `any_whitespace` a model may
spend its whole budget on blanks, which are valid JSON but nothing a client wants.
"""
from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from pdserve.common.errors import Cause, ServeError
from pdserve.common.sampling import SamplingParams
from pdserve.engine.sequence import Sequence

KINDS = ("json", "json_object", "regex", "choice", "grammar")
COMPILER_THREADS = 2    # a schema's compile may use this many threads (xgrammar builds its token masks in parallel)
SCHEMA_GRAMMARS = 256   # JSON schemas whose grammar text is kept (the compiled grammars are in xgrammar's cache)

# xgrammar 0.2.9 writes a string with maxLength/minLength as characters of [^"\\\r\n] (its grammar
# text below), which lets raw control characters into JSON strings: invalid JSON, refused by strict
# parsers such as Python's json. Its unbounded strings exclude them, as every string should.
_LOOSE_CHARACTER = r'[^\"\\\r\n]'
_JSON_CHARACTER = r'[^\0-\x1f\"\\\r\n]'
# An integer (or a number's integer part) of unbounded digits lets a greedy model that repeats a
# digit never leave it; 19 digits hold any 64-bit integer, which is what JSON readers keep.
_ANY_DIGITS = "[1-9] [0-9]*"
_INT64_DIGITS = "[1-9] [0-9]{0, 18}"


@functools.lru_cache(maxsize=SCHEMA_GRAMMARS)
def json_grammar(schema: str) -> str:
    """The EBNF grammar of compact JSON that validates against the schema."""
    text = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    return text.replace(_LOOSE_CHARACTER, _JSON_CHARACTER).replace(_ANY_DIGITS, _INT64_DIGITS)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar of exactly one of the strings (vLLM's `choice`)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """Compiles the grammars of one tokenizer; safe to call from any thread (xgrammar's compiler
    caches each compiled grammar, so a spec compiled at admission is found again by the engine)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Seq[int]):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=COMPILER_THREADS)

    def compile(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        """The compiled grammar; a spec it cannot compile is INVALID_ARGUMENT naming the part."""
        try:
            if kind in ("json", "json_object"):
                return self.compiler.compile_grammar(json_grammar(spec if kind == "json" else '{"type": "object"}'))
            if kind == "regex":
                return self.compiler.compile_regex(spec)
            if kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(json.loads(spec)))
            if kind == "grammar":
                return self.compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            # xgrammar's message says what in the spec it could not take; its first line is the reason
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ServeError(Cause.INVALID_ARGUMENT, f"structured output '{kind}' cannot be compiled: "
                                                     f"{reason.split('] ', 1)[-1]}") from exc
        raise ServeError(Cause.INVALID_ARGUMENT, f"structured output kind '{kind}' is unknown; "
                                                 f"supported: {', '.join(KINDS)}")


class StructuredOutputs:
    """The matchers of an engine's constrained requests (engine thread) and the masks of a step."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Seq[int], overlap: bool = True):
        self._make = lambda: Grammars(tokenizer, vocab_size, stop_token_ids)
        self._grammars: Grammars | None = None
        self._lock = threading.Lock()
        self.vocab_size = vocab_size
        self.matchers: dict[str, xgr.GrammarMatcher] = {}
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks") if overlap else None
        self._masks: Future | None = None

    @property
    def grammars(self) -> Grammars:
        """Built at the first constrained request: an engine that never sees one pays nothing."""
        with self._lock:
            if self._grammars is None:
                self._grammars = self._make()
            return self._grammars

    def check(self, params: SamplingParams) -> None:
        """Compiles the request's grammar (a cache hit later); raises INVALID_ARGUMENT if it cannot."""
        if params.structured_kind:
            self.grammars.compile(params.structured_kind, params.structured_spec)

    # ---- engine thread -------------------------------------------------------------------------
    def new_matcher(self, params: SamplingParams) -> xgr.GrammarMatcher | None:
        if not params.structured_kind:
            return None
        return xgr.GrammarMatcher(self.grammars.compile(params.structured_kind, params.structured_spec))

    def start(self, request_id: str, matcher: xgr.GrammarMatcher | None, resume_token_ids: Seq[int] = ()) -> None:
        """Follows the request from here; a migrated request's matcher first takes the tokens already sent."""
        if matcher is not None:
            for token_id in resume_token_ids:
                matcher.accept_token(token_id)
            self.matchers[request_id] = matcher

    def forget(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)

    def accept(self, request_id: str, token_id: int) -> bool:
        """Follows a sampled token; True when the request's grammar has ended (or refused the token)."""
        matcher = self.matchers.get(request_id)
        if matcher is None:
            return False
        return not matcher.accept_token(token_id) or matcher.is_terminated()

    def begin_step(self, seqs: Seq[Sequence]) -> None:
        """Starts filling the masks of the step's constrained sequences (beside the forward pass)."""
        self._masks = None
        if not self.matchers:
            return
        ids = [s.request_id for s in seqs if s.request_id in self.matchers]
        if ids:
            self._masks = (self._helper.submit(self._fill, ids) if self._helper is not None
                           else _done(self._fill(ids)))

    def _fill(self, request_ids: list[str]) -> tuple[dict[str, int], torch.Tensor]:
        masks = xgr.allocate_token_bitmask(len(request_ids), self.vocab_size)
        for row, request_id in enumerate(request_ids):
            self.matchers[request_id].fill_next_token_bitmask(masks, row)
        return {r: i for i, r in enumerate(request_ids)}, masks

    def apply(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
        """The sampler's hook: masks the constrained rows of logits [len(seqs), vocab] in place."""
        if not self.matchers:
            return
        rows = [i for i, s in enumerate(seqs) if s.request_id in self.matchers]
        if not rows:
            return
        filled, masks = self._masks.result() if self._masks is not None else ({}, None)
        missing = [seqs[i].request_id for i in rows if seqs[i].request_id not in filled]
        if missing:   # not in the step begin_step saw (cannot happen today): filled now
            filled, masks = self._fill([seqs[i].request_id for i in rows])
        full = torch.full((len(seqs), masks.shape[1]), -1, dtype=masks.dtype)   # -1: every token allowed
        full[rows] = masks[[filled[seqs[i].request_id] for i in rows]]
        xgr.apply_token_bitmask_inplace(logits, full.to(logits.device), vocab_size=self.vocab_size, indices=rows)

    def end_step(self) -> None:
        self._masks = None


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future

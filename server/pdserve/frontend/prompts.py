"""Prompts become token ids on the front end: engines take token ids and only detokenize.

Tokenizing once, here, gives the router the prompt's KV block hashes (common/block_hash.py) for
cache-aware choices and catches prompts over max_model_len before any engine sees them. The
model version's tokenizer.json is loaded with the `tokenizers` package (the Rust tokenizer that
transformers' fast tokenizers wrap, without torch or transformers) once per folder, and it
encodes with special tokens added, as transformers' tokenizer does. Loading and encoding run in a
small thread pool (the batch call releases the GIL), never on the event loop.

A prompt whose byte length alone proves it too long is refused before it is tokenized: for a
tokenizer that represents every input byte in its tokens (byte-level or byte-fallback, with at
most Unicode normalization), a token covers at most the bytes of the longest vocabulary entry.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pdserve.common.block_hash import block_hashes
from pdserve.common.errors import Cause, ServeError

log = logging.getLogger(__name__)

MAX_TOKENIZERS = 64   # version folders whose tokenizer stays loaded (least recently used dropped)
# Unicode normal forms can shrink text: composition folds up to three code points (Hangul jamo)
# into one of no more bytes than each, so normalized text keeps at least a third of the bytes.
NORMALIZED_BYTES_FLOOR = 3
LOSSLESS_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Prepend"}
LOSSLESS_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "Split"}


@dataclass(frozen=True)
class PromptTokens:
    token_ids: list[int]
    block_hashes: list[int]   # of the full blocks at block_size; empty when no block size is known
    block_size: int           # 0: none


def _parts(component: dict | None) -> list[dict]:
    """A tokenizer.json component and, for a Sequence, its members."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [p for member in component.get("normalizers", component.get("pretokenizers", []))
                for p in _parts(member)]
    return [component]


def _keeps_every_byte(spec: dict) -> bool:
    """Whether the tokenizer described by tokenizer.json turns every byte of its input into token
    bytes (after Unicode normalization): no normalizer or pre-tokenizer that drops text, and a
    model that never maps unknown text to one [UNK] token."""
    for part in _parts(spec.get("normalizer")):
        if part.get("type") == "Replace":
            pattern = part.get("pattern", {}).get("String")
            if pattern is None or len(part.get("content", "").encode()) < len(pattern.encode()):
                return False
        elif part.get("type") not in LOSSLESS_NORMALIZERS:
            return False
    pre = _parts(spec.get("pre_tokenizer"))
    for part in pre:
        if part.get("type") not in LOSSLESS_PRE_TOKENIZERS or part.get("behavior") == "Removed":
            return False
    model = spec.get("model", {})
    byte_level = any(p.get("type") == "ByteLevel" for p in pre)
    return model.get("type") == "BPE" and (byte_level or bool(model.get("byte_fallback")))


def max_bytes_per_token(spec: dict, vocabulary: list[str]) -> int | None:
    """How many input bytes one token can stand for at most, or None when the tokenizer can drop
    text (then no byte length proves a prompt too long). A vocabulary entry's UTF-8 length bounds
    the bytes it stands for: byte-level symbols and byte-fallback tokens spell a byte in one or
    more characters."""
    if not _keeps_every_byte(spec) or not vocabulary:
        return None
    longest = max(len(token.encode()) for token in vocabulary)
    return longest * (NORMALIZED_BYTES_FLOOR if spec.get("normalizer") else 1)


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: object                   # tokenizers.Tokenizer
    bytes_per_token: int | None         # max_bytes_per_token of it


def _load(folder: str) -> LoadedTokenizer:
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ServeError(Cause.MODEL_NOT_READY, f"the model version folder {folder} has no tokenizer.json: pdserve "
                                                "tokenizes prompts with it; save the tokenizer with transformers' "
                                                "save_pretrained, which writes it")
    from tokenizers import Tokenizer
    try:
        tokenizer = Tokenizer.from_file(path)
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except Exception as exc:
        raise ServeError(Cause.MODEL_NOT_READY, f"cannot load {path}: {exc}") from exc
    return LoadedTokenizer(tokenizer, max_bytes_per_token(spec, list(tokenizer.get_vocab(with_added_tokens=True))))


def too_long(n_tokens: int, max_model_len: int) -> ServeError:
    return ServeError(Cause.INVALID_ARGUMENT, f"the prompt has {n_tokens} tokens but max_model_len is {max_model_len}; "
                                              f"shorten the prompt to at most {max_model_len - 1} tokens")


def encode(loaded: LoadedTokenizer, text: str, max_model_len: int = 0, block_size: int = 0,
           add_special_tokens: bool = True) -> PromptTokens:
    """The prompt's token ids (and block hashes at block_size); ServeError when it is empty or has
    max_model_len tokens or more (0: no limit known here; the engine still checks)."""
    if max_model_len and loaded.bytes_per_token:
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        if n_bytes > max_model_len * loaded.bytes_per_token:
            raise ServeError(Cause.INVALID_ARGUMENT,
                             f"the prompt has {n_bytes} bytes, more than max_model_len ({max_model_len}) tokens can "
                             f"hold with this tokenizer (at most {loaded.bytes_per_token} bytes a token); shorten the "
                             f"prompt to under {max_model_len} tokens")
    # encode_batch, not encode: only the batch call lets go of the GIL while it works
    ids = loaded.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    if not ids:
        raise ServeError(Cause.INVALID_ARGUMENT, "the prompt is empty; send at least one token of text in 'text_input'")
    if max_model_len and len(ids) >= max_model_len:
        raise too_long(len(ids), max_model_len)
    return PromptTokens(ids, block_hashes(ids, block_size) if block_size else [], block_size)


def bad_words_token_ids(tokenizer, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenization of bad_words: each word as it would start the text, and as it would
    follow a space when that is a different token sequence of the same length (a word in the
    middle of a sentence)."""
    out = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False).ids
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False).ids
        out += [tuple(alone)] if alone else []
        if spaced and alone and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(tuple(spaced))
    return tuple(out)


class PromptTokenizers:
    def __init__(self, workers: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdserve-tokenize")
        self._tokenizers: OrderedDict[str, asyncio.Future] = OrderedDict()   # version folder -> LoadedTokenizer

    async def tokenizer(self, folder: str) -> LoadedTokenizer:
        """The version folder's tokenizer, loaded once; ServeError when it has none that loads."""
        future = self._tokenizers.get(folder)
        if future is None or (future.done() and future.exception() is not None):
            future = self._tokenizers[folder] = asyncio.get_running_loop().run_in_executor(self._pool, _load, folder)
            while len(self._tokenizers) > MAX_TOKENIZERS:
                self._tokenizers.popitem(last=False)
        else:
            self._tokenizers.move_to_end(folder)
        return await asyncio.shield(future)

    async def encode(self, folder: str, text: str, max_model_len: int = 0, block_size: int = 0,
                     add_special_tokens: bool = True) -> PromptTokens:
        loaded = await self.tokenizer(folder)
        return await asyncio.get_running_loop().run_in_executor(self._pool, encode, loaded, text, max_model_len,
                                                                block_size, add_special_tokens)

    async def token_ids(self, folder: str, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's token ids, unchecked (the /tokenize endpoint)."""
        loaded = await self.tokenizer(folder)
        encoded = await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: loaded.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens))
        return encoded[0].ids

    async def bad_words(self, folder: str, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        loaded = await self.tokenizer(folder)
        return await asyncio.get_running_loop().run_in_executor(self._pool, bad_words_token_ids, loaded.tokenizer,
                                                                words)

    async def text(self, folder: str, token_ids: list[int]) -> str:
        """The token ids' text, special tokens included (the /detokenize endpoint)."""
        loaded = await self.tokenizer(folder)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: loaded.tokenizer.decode(token_ids, skip_special_tokens=False))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

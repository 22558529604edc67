"""A prompt's length and KV block hashes on the front end, for the router (kv_aware).

Engines tokenize the prompts they serve; a cache-aware choice needs the same token ids before
the request leaves, to compare the prompt's block hashes (common/block_hash.py) with what each
engine caches. The model version's tokenizer.json is loaded with the `tokenizers` package (the
Rust tokenizer that transformers' fast tokenizers wrap, without torch or transformers) once per
version folder, and it encodes with special tokens added, as the engine's AutoTokenizer.encode
does. Loading and encoding run in a small thread pool, never on the event loop. A version folder
without tokenizer.json (or with one that does not load) gives no hashes: the router then scores
by load alone.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from pdserve.common.block_hash import TOKENIZER_PROBE, block_hashes, tokenizer_fingerprint

log = logging.getLogger(__name__)

MAX_TOKENIZERS = 64   # version folders whose tokenizer stays loaded (least recently used dropped)


def estimate_tokens(text: str) -> int:
    """A prompt's length in tokens when it is not tokenized here (about 4 characters a token):
    enough to count an engine's fresh load."""
    return (len(text) + 3) // 4


def _load(folder: str):
    """(the folder's tokenizer, its fingerprint: how it splits TOKENIZER_PROBE), or None."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        log.info("no %s: requests to this model version are routed by load only", path)
        return None
    try:
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(path)
        return tokenizer, tokenizer_fingerprint(tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=True).ids)
    except Exception as exc:   # a tokenizer this package cannot read costs the cache awareness only
        log.warning("cannot load %s (%s): requests to this model version are routed by load only", path, exc)
        return None


def _encode(tokenizer, text: str, block_size: int) -> tuple[int, list[int]]:
    # encode_batch, not encode: only the batch call lets go of the GIL while it works, and a
    # 1,000-character prompt takes about a millisecond, which would otherwise stop the event loop
    ids = tokenizer.encode_batch([text], add_special_tokens=True)[0].ids
    return len(ids), block_hashes(ids, block_size)


class PromptTokenizers:
    def __init__(self, workers: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdserve-tokenize")
        # version folder -> (tokenizer, fingerprint) or None
        self._tokenizers: OrderedDict[str, asyncio.Future] = OrderedDict()
        self._mismatch_logged: set[str] = set()

    async def tokenizer(self, folder: str):
        """The version folder's tokenizer and its fingerprint (None: it has none), loaded once."""
        future = self._tokenizers.get(folder)
        if future is None:
            future = self._tokenizers[folder] = asyncio.get_running_loop().run_in_executor(self._pool, _load, folder)
            while len(self._tokenizers) > MAX_TOKENIZERS:
                self._tokenizers.popitem(last=False)
        else:
            self._tokenizers.move_to_end(folder)
        return await asyncio.shield(future)

    async def hashes(self, folder: str, text: str, block_size: int,
                     engines_probe: int | None = None) -> tuple[int, list[int]] | None:
        """(token count, block hashes at block_size) of the prompt; None without a tokenizer, or
        when it does not split text as the engines do (their fingerprint, engines_probe)."""
        loaded = await self.tokenizer(folder)
        if loaded is None:
            return None
        tokenizer, mine = loaded
        if engines_probe is not None and mine != engines_probe:
            if folder not in self._mismatch_logged:
                self._mismatch_logged.add(folder)
                log.warning("%s/tokenizer.json splits text unlike the engines' tokenizer (transformers may override "
                            "its pre-tokenizer): requests to this model version are routed by load only", folder)
            return None
        return await asyncio.get_running_loop().run_in_executor(self._pool, _encode, tokenizer, text, block_size)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

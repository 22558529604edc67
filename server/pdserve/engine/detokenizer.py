"""Incremental detokenization: text pieces that never split a UTF-8 character, with stop strings.

A piece is released only when decoding the new tokens gives complete characters (no
trailing U+FFFD). While stop strings are set, the last len(longest stop) - 1 characters are
held back, so text that turns out to begin a stop string is never sent.
"""
from __future__ import annotations

import functools


def text_of_ids(tokenizer):
    """ids -> text as `tokenizer.decode(ids, skip_special_tokens=True)` gives it. For a fast
    tokenizer that cleans up no spaces, transformers' decode only wraps the Rust tokenizer's
    own, which is called directly: a quarter of the time, twice per token of every sequence."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


class IncrementalDetokenizer:
    def __init__(self, decode, stop: tuple[str, ...] = ()):
        self._decode = decode   # ids -> text: text_of_ids(tokenizer), one per engine
        self.stop = tuple(s for s in stop if s)
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = 0   # first token of the window being decoded
        self.read_offset = 0     # tokens before this are already in self.text
        self.text = ""
        self.sent = 0            # characters of self.text already released
        self.stopped = False

    def add_token(self, token_id: int, check_stop: bool = True) -> bool:
        """Adds one generated token; returns True when a stop string ends the text."""
        self.token_ids.append(token_id)
        known = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.token_ids[self.prefix_offset:])
        if len(window) > len(known) and not window.endswith("\ufffd"):
            self.text += window[len(known):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
        return check_stop and self._check_stop()

    def _check_stop(self) -> bool:
        for s in self.stop:
            idx = self.text.find(s, max(0, self.sent - len(s)))
            if idx >= 0:
                self.text = self.text[:idx]
                self.stopped = True
                return True
        return False

    def flush(self) -> None:
        """At the end of a sequence: takes in whatever bytes are still pending."""
        if self.read_offset < len(self.token_ids) and not self.stopped:
            known = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
            window = self._decode(self.token_ids[self.prefix_offset:])
            self.text += window[len(known):]
            self.read_offset = len(self.token_ids)
            self._check_stop()

    def take_piece(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold_back)
        piece = self.text[self.sent:end]
        self.sent = end
        return piece

"""Tool calls in chat completions (OpenAI's `tools` and `tool_choice`, as vLLM serves them).

`required` and a named function are enforced by constrained decoding (engine/structured.py), with
vLLM's schemas: `required` generates a JSON list of {"name", "parameters"} objects (at least one, each
name one of the tools, its parameters that tool's schema), a named function its arguments alone.
`auto` leaves the model free and reads its text afterwards: Hermes/Qwen `<tool_call>{...}</tool_call>`
blocks first, then Llama 3's bare `{"name": ..., "parameters": ...}` (after an optional
`<|python_tag|>`). Text that calls no offered tool stays the message's content.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
LLAMA_PREFIX = "<|python_tag|>"


@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"     # none, auto, required, or function (then `name` is the function)
    name: str = ""


def parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def forced_schema(tools: tuple[dict, ...], choice: ToolChoice) -> str | None:
    """The JSON schema the output must follow (as text), or None when the model is free."""
    if choice.mode == "function":
        tool = next(t for t in tools if t["function"]["name"] == choice.name)
        return json.dumps(parameters(tool), ensure_ascii=False)
    if choice.mode != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                               "parameters": parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    return json.dumps({"type": "array", "minItems": 1, "items": {"anyOf": calls}}, ensure_ascii=False)


def _call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": text}}


def _named_calls(objects: list, names: set[str]) -> list[dict]:
    """{"name", "arguments" | "parameters"} objects naming offered tools, as OpenAI tool calls."""
    calls = []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return []
        calls.append(_call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
    return calls


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse(text: str, tools: tuple[dict, ...], choice: ToolChoice) -> tuple[str | None, list[dict]]:
    """The message's content and tool calls read from the model's text."""
    names = {t["function"]["name"] for t in tools}
    if choice.mode == "function":
        return None, [_call(choice.name, text)]
    if choice.mode == "required":
        found = _json(text)
        calls = _named_calls(found if isinstance(found, list) else [], names)
        return (None, calls) if calls else (text, [])
    if choice.mode == "none" or not tools:
        return text, []
    blocks = HERMES_CALL.findall(text)
    if blocks:
        calls = _named_calls([_json(b) for b in blocks], names)
        if calls:
            content = text[:text.index("<tool_call>")].strip()
            return content or None, calls
    bare = text.strip().removeprefix(LLAMA_PREFIX).strip()
    if bare.startswith("{"):
        found = _json(bare)
        calls = _named_calls(found if isinstance(found, list) else [found], names)
        if calls:
            return None, calls
    return text, []


def stream_deltas(calls: list[dict], first: int = 0) -> list[dict]:
    """The deltas that carry whole calls in a stream, one a call: its id, name and arguments."""
    return [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls, first)]


class _CallScanner:
    """Reads one JSON call object, {"name": ..., "arguments" | "parameters": {...}}, as its text
    grows: its name once the name's string is whole, and the span of its arguments' raw JSON,
    open until the value closes. Strings and nesting are followed character by character."""

    def __init__(self):
        self.depth = 0              # nesting, the call object being 1
        self.in_string = self.escape = False
        self.string = ""            # the string being read at depth 1 (a key or the name)
        self.key = ""               # the last key read at depth 1
        self.after_colon = False
        self.name: str | None = None
        self.args_start = self.args_end = None   # offsets into the text fed
        self.closed = False
        self.pos = 0

    def feed(self, text: str) -> None:
        while self.pos < len(text) and not self.closed:
            c, at = text[self.pos], self.pos
            self.pos += 1
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 1 and not self.after_colon:
                        self.key = self.string
                    elif self.depth == 1 and self.key == "name":
                        self.name = json.loads('"' + self.string + '"') if "\\" in self.string else self.string
                elif self.depth == 1:
                    self.string += c
                continue
            if c == '"':
                self.in_string, self.string = True, ""
            elif c in "{[":
                if self.depth == 1 and self.after_colon and self.key in ("arguments", "parameters"):
                    self.args_start = at
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1 and self.args_start is not None and self.args_end is None:
                    self.args_end = self.pos
                self.closed = self.depth == 0
            elif c == ":" and self.depth == 1:
                self.after_colon = True
            elif c == "," and self.depth == 1:
                self.after_colon = False


class CallStream:
    """Tool calls read from the model's text as it streams, as OpenAI streams them: a call's id and
    name in one delta once its name is whole, then its arguments' JSON text in pieces as the model
    writes it. `auto` streams the text before a Hermes `<tool_call>` as content; text that may be
    a bare Llama 3 call (it starts with `{`) waits for the end, and is then read whole."""

    def __init__(self, tools: tuple[dict, ...], choice: ToolChoice):
        self.tools, self.choice = tools, choice
        self.names = {t["function"]["name"] for t in tools}
        self.text = ""
        self.calls: list[dict] = []         # announced: {"id", "name"}
        self.sent_args = 0                  # characters of the current call's arguments sent
        self.sent_content = 0
        self.scanner: _CallScanner | None = None
        self.base = 0                       # where the current call's object starts in self.text
        self.done = 0                       # calls read to their end
        self.resume = 0                     # where the text after the last call read starts
        self.held = False                   # auto: waiting for the end to read a bare call

    def feed(self, piece: str) -> list[dict]:
        """The deltas a piece of text gives."""
        self.text += piece
        if self.choice.mode == "function":
            if not self.calls:
                self.calls.append(_call(self.choice.name, ""))
                return [{"tool_calls": [{"index": 0, **self.calls[0]}]}] + self._arguments_delta(self.text)
            return self._arguments_delta(piece)
        if self.choice.mode == "required":
            return self._scan(self.base if self.scanner is not None else self._next_call(self.resume))
        return self._auto()

    def _arguments_delta(self, text: str) -> list[dict]:
        return [{"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": text}}]}] if text else []

    def _scan(self, start: int) -> list[dict]:
        """Follows call objects from `start` in the text: announces each, streams its arguments."""
        deltas = []
        while start >= 0:
            if self.scanner is None:
                self.scanner, self.base, self.sent_args = _CallScanner(), start, 0
            sc = self.scanner
            sc.feed(self.text[self.base:])
            announced = len(self.calls) > self.done
            if not announced and sc.name in self.names:
                self.calls.append(_call(sc.name, ""))
                deltas.append({"tool_calls": [{"index": self.done, **self.calls[-1]}]})
                announced = True
            if announced and sc.args_start is not None:
                end = sc.args_end if sc.args_end is not None else sc.pos
                deltas += self._arguments_delta(self.text[self.base + sc.args_start + self.sent_args:self.base + end])
                self.sent_args = end - sc.args_start
            if not sc.closed:
                return deltas
            self.scanner, self.done, self.resume = None, self.done + announced, self.base + sc.pos
            start = self._next_call(self.resume)
        return deltas

    def _next_call(self, pos: int) -> int:
        if self.choice.mode == "required":
            return self.text.find("{", pos)
        tag = self.text.find("<tool_call>", pos)
        return -1 if tag < 0 else self.text.find("{", tag)

    def _auto(self) -> list[dict]:
        if self.choice.mode == "none" or not self.tools:
            return self._content(len(self.text))
        if self.scanner is not None or self.calls:
            return self._scan(self.base if self.scanner is not None else self._next_call(self.resume))
        stripped = self.text.lstrip()
        if self.held or stripped.startswith(("{", LLAMA_PREFIX)):
            self.held = True
            return []
        if not stripped or (LLAMA_PREFIX.startswith(stripped) and not "<tool_call>".startswith(stripped)):
            return []   # may yet begin a bare call
        tag = self.text.find("<tool_call>")
        if tag < 0:   # all but what may begin the tag
            keep = next((k for k in range(len("<tool_call>") - 1, 0, -1) if self.text.endswith("<tool_call>"[:k])), 0)
            return self._content(len(self.text) - keep)
        deltas = self._content(tag)
        start = self.text.find("{", tag)
        return deltas + (self._scan(start) if start >= 0 else [])

    def _content(self, end: int) -> list[dict]:
        text = self.text[self.sent_content:end]
        self.sent_content = max(self.sent_content, end)
        return [{"content": text}] if text else []

    def finish(self) -> tuple[list[dict], bool]:
        """The last deltas, and whether the message called tools (finish reason tool_calls)."""
        if self.calls:
            return [], True
        content, calls = parse(self.text, self.tools, self.choice)
        if calls:
            return stream_deltas(calls), True
        return ([{"content": self.text[self.sent_content:]}] if self.text[self.sent_content:] else []), False

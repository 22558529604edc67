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


def stream_deltas(calls: list[dict]) -> list[dict]:
    """The deltas that carry calls in a stream, one a call: its id, name and arguments whole."""
    return [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]

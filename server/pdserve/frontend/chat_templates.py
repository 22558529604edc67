"""Chat templates: a model version folder's template (tokenizer_config.json's `chat_template`, or
chat_template.jinja beside it), compiled once and rendered with Jinja2 as transformers renders it
(sandboxed, trim_blocks and lstrip_blocks, `raise_exception`, a `tojson` filter). A model
without one gets ChatML. A template that refuses or cannot render the messages is the request's
fault as the client sees it: a 400 naming `messages`.
"""
from __future__ import annotations

import json
import logging
import os

from pdserve.common.errors import ServeError
from pdserve.frontend.protocol import InvalidInput

log = logging.getLogger(__name__)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _read_template(folder: str) -> tuple[str, dict]:
    """The template's source and the special tokens it may name (bos_token, eos_token)."""
    template, tokens = None, {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        for key in ("bos_token", "eos_token"):
            value = config.get(key)
            tokens[key] = value.get("content", "") if isinstance(value, dict) else (value or "")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if not template and os.path.exists(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    if not template:
        log.warning("%s has no chat template; chat prompts use ChatML", folder)
        template = CHATML
    return template, tokens


def tools_prompt(tools: tuple[dict, ...]) -> str:
    """The tools as Qwen2.5's template describes them, for templates that do not."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + listed +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def _raise_exception(message):
    raise InvalidInput(f"the model's chat template refused the messages: {message}", "messages")


class ChatTemplates:
    """The chat template of each model version folder, compiled once."""

    def __init__(self):
        self._cache: dict[str, tuple] = {}
        self._renders_tools: dict[str, bool] = {}

    def load(self, folder: str):
        if folder in self._cache:
            return self._cache[folder]
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template, tokens = _read_template(folder)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise_exception
        compiled = (env.from_string(template), tokens)
        self._renders_tools[folder] = "tools" in template
        self._cache[folder] = compiled
        return compiled

    def render(self, folder: str, messages: list[dict], add_generation_prompt: bool = True,
               tools: tuple[dict, ...] = ()) -> str:
        """With tools, a template that renders them gets them as `tools`; one that does not
        (ChatML, the demo's) gets them described in a system message, in Hermes/Qwen's words."""
        template, tokens = self.load(folder)
        if tools and not self._renders_tools.get(folder):
            messages = [{"role": "system", "content": tools_prompt(tools)}, *messages]
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=list(tools) or None, **tokens)
        except ServeError:
            raise
        except Exception as exc:  # a template error is the messages' fault as the client sees it
            raise InvalidInput(f"the chat template could not render these messages ({exc})", "messages") from exc

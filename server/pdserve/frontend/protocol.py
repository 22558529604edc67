"""The request schemas of every door, declared once as pydantic models (as vLLM's
entrypoints/openai/protocol.py declares its own), with the field names vLLM and OpenAI use.

    SamplingParameters     KServe's `sampling_parameters` JSON (Triton's vLLM backend), the same
                           keys sent as request parameters, and TensorRT-LLM-style tensors mapped
                           onto them (frontend/tensors.py, frontend/trtllm.py)
    CompletionRequest      OpenAI's POST /v1/completions
    ChatCompletionRequest  OpenAI's POST /v1/chat/completions

Both kinds share SamplingFields, so a setting means the same on every door and turns into the
same SamplingParams. `Schema.parse` answers a refused request with one InvalidInput that names the
field at fault (OpenAI's `param`); its message is the field and what is wrong with it, e.g.
"'temperature' is -1; it must be >= 0.0" (the KServe doors put "sampling_parameters " before it).

Numbers may come as strings ("0.5"), as Triton's vLLM backend reads them; booleans are never
numbers. Floats must fit float32 (the engine RPC carries them so). OpenAI fields pdserve does not
implement are accepted only at their neutral value; unknown OpenAI fields are ignored, unknown
sampling_parameters keys refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from typing import Annotated, Any

import numpy as np
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      model_validator)
from pydantic_core import PydanticCustomError

from pdserve.common.constants import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from pdserve.common.errors import Cause, ServeError
from pdserve.common.sampling import MAX_LOGPROBS, SamplingParams
from pdserve.frontend.tool_calls import ToolChoice, forced_schema

INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_TOKENS_UNSET = INT32_MAX   # chat without max_tokens: until EOS or max_model_len, as vLLM
MAX_CHOICES = 16               # n and best_of: each choice is an engine request of its own
MAX_LOGIT_BIAS = 1024          # entries of logit_bias


class InvalidInput(ServeError):
    """INVALID_ARGUMENT; the message tells the client what to change, `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(Cause.INVALID_ARGUMENT, message)
        self.param = param


_REPR = reprlib.Repr()   # a client's value, quoted in a message: a 5000-digit number shown in part
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 80, 40, 80
_shown = _REPR.repr


def _refuse(detail: str, field: str | None = None) -> PydanticCustomError:
    """A validation error whose text is ours: "<field> <detail>". `field` names the field when the
    error is raised by a model validator (which has no location of its own)."""
    return PydanticCustomError("pdserve", "{detail}", {"detail": detail, "field": field})


# ---- field types ----------------------------------------------------------------------------------
def _integer(value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _refuse(f"is {_shown(value)}; it must be a number")
    try:
        number = int(value, 10) if isinstance(value, str) else value
    except ValueError:
        raise _refuse(f"is {_shown(value)}; it must be an integer") from None
    if isinstance(number, float):
        if not number.is_integer():
            raise _refuse(f"is {_shown(value)}; it must be an integer")
        number = int(number)
    return number


def _float32(value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _refuse(f"is {_shown(value)}; it must be a number")
    try:
        number = float(value)
    except ValueError:
        raise _refuse(f"is {_shown(value)}; it must be a number") from None
    except OverflowError:   # an integer beyond any float
        number = math.inf
    if not (math.isfinite(number) and abs(number) <= FLOAT32_MAX):
        raise _refuse(f"is {_shown(value)}; it must be finite (at most 3.4e38)")
    return number


def _not_zero_in_float32(value: float) -> float:
    if np.float32(value) == 0.0:
        raise _refuse(f"is {_shown(value)}; it rounds to 0 in float32, use a value of at least 1e-38")
    return value


def _flag(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _refuse(f"is {_shown(value)}; it must be true or false")


def _stop(value):
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _refuse("must be a non-empty string or a list of them")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
        raise _refuse(f"has {len(stop)} strings of up to {max(map(len, stop))} characters; the limits are "
                      f"{MAX_STOP_STRINGS} strings of {MAX_STOP_STRING_CHARS} characters")
    return tuple(stop)


def _bad_words(value):
    """A list of strings (a KServe request parameter: as JSON text)."""
    value = _object_text(value)
    if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise _refuse("must be a list of strings")
    words = tuple(w for w in value if w.strip())
    if len(words) > MAX_STOP_STRINGS or any(len(w) > MAX_STOP_STRING_CHARS for w in words):
        raise _refuse(f"has {len(words)} words of up to {max(map(len, words))} characters; the limits are "
                      f"{MAX_STOP_STRINGS} words of {MAX_STOP_STRING_CHARS} characters")
    return words


def _token_ids(value):
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= INT32_MAX
                                              for i in value):
        raise _refuse("must be a list of token ids (integers from 0 to 2^31 - 1)")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise _refuse(f"has {len(value)} ids; the limit is {MAX_STOP_TOKEN_IDS}")
    return tuple(value)


def _logit_bias(value):
    """OpenAI's {"token id": bias} (ids as strings in JSON), biases from -100 to 100."""
    if not isinstance(value, dict):
        raise _refuse('must be an object such as {"50256": -100} (token id: bias)')
    if len(value) > MAX_LOGIT_BIAS:
        raise _refuse(f"has {len(value)} entries; the limit is {MAX_LOGIT_BIAS}")
    bias = {}
    for key, number in value.items():
        try:
            token = _integer(key)
        except PydanticCustomError:
            token = -1
        if not 0 <= token <= INT32_MAX:
            raise _refuse(f"has the key {_shown(key)}; keys must be token ids (integers from 0)")
        number = _float32(number)
        if not -100.0 <= number <= 100.0:
            raise _refuse(f"gives token {token} the bias {number}; biases go from -100 to 100")
        bias[token] = number
    return tuple(sorted(bias.items()))


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")   # vLLM's structured_outputs keys
NO_CONSTRAINT = ("", "")


def _json_schema(value, what: str) -> str:
    """A JSON schema (an object, or its JSON text) as compact JSON text; the engine compiles it."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _refuse(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise _refuse(f"{what} must be a JSON schema (an object)")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _object_text(value):
    """An object sent as JSON text (a KServe request parameter is a string) as the object."""
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        raise _refuse("is not valid JSON") from None


def _structured_outputs(value):
    """vLLM's structured_outputs: one of json (a schema), regex, choice (strings), grammar (EBNF),
    json_object (true), as (kind, spec) for the engine (common/sampling.py)."""
    value = _object_text(value)
    if not isinstance(value, dict):
        raise _refuse(f"must be an object with one of {', '.join(STRUCTURED_KINDS)}")
    unknown = sorted(set(value) - set(STRUCTURED_KINDS))
    if unknown:
        raise _refuse(f"has unknown key(s) {unknown}; supported: {', '.join(STRUCTURED_KINDS)}")
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    if len(given) != 1:
        raise _refuse(f"must set exactly one of {', '.join(STRUCTURED_KINDS)}; it sets {sorted(given) or 'none'}")
    ((kind, spec),) = given.items()
    if kind == "json":
        return kind, _json_schema(spec, "json")
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise _refuse("choice must be a non-empty list of non-empty strings")
        return kind, json.dumps(spec, ensure_ascii=False)
    if kind == "json_object":
        if spec is not True:
            raise _refuse("json_object must be true")
        return kind, ""
    if not isinstance(spec, str) or not spec:
        raise _refuse(f"{kind} must be a non-empty string")
    return kind, spec


def _response_format(value):
    """OpenAI's response_format: text, json_object, or json_schema {json_schema: {name, schema}}."""
    value = _object_text(value)
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return NO_CONSTRAINT
    if kind == "json_object":
        return "json_object", ""
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise _refuse('json_schema must be an object with a "schema" (and a "name")')
        return "json", _json_schema(spec["schema"], "json_schema.schema")
    raise _refuse(f'is {_shown(value)}; its "type" must be text, json_object or json_schema')


def _only(*allowed):
    """An OpenAI field pdserve does not implement: accepted at its neutral value (allowed[0])."""
    def check(value):
        if value is not None and value not in allowed:
            raise _refuse(f"is {_shown(value)}; pdserve supports only {allowed[0]!r} (or leaving it out)")
        return value
    return AfterValidator(check)


MaxTokens = Annotated[int, BeforeValidator(_integer), Field(ge=1, le=INT32_MAX)]
Temperature = Annotated[float, BeforeValidator(_float32), Field(ge=0.0)]
TopP = Annotated[float, BeforeValidator(_float32), Field(gt=0.0, le=1.0), AfterValidator(_not_zero_in_float32)]
TopK = Annotated[int, BeforeValidator(_integer), Field(ge=-1, le=INT32_MAX)]     # -1 (vLLM) and 0: all tokens
Seed = Annotated[int | None, BeforeValidator(_integer), Field(ge=0, le=2**63 - 1)]
MinTokens = Annotated[int, BeforeValidator(_integer), Field(ge=0)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Stop = Annotated[tuple[str, ...], BeforeValidator(_stop)]
BadWords = Annotated[tuple[str, ...], BeforeValidator(_bad_words)]
StopTokenIds = Annotated[tuple[int, ...], BeforeValidator(_token_ids)]
StreamInterval = Annotated[int, BeforeValidator(_integer), Field(ge=1, le=INT32_MAX)]
Penalty = Annotated[float, BeforeValidator(_float32), Field(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, BeforeValidator(_float32), Field(gt=0.0, le=100.0)]
LogitBias = Annotated[tuple[tuple[int, float], ...], BeforeValidator(_logit_bias)]
MinP = Annotated[float, BeforeValidator(_float32), Field(ge=0.0, le=1.0)]
Logprobs = Annotated[int | None, BeforeValidator(_integer), Field(ge=0, le=MAX_LOGPROBS)]
ChoiceCount = Annotated[int, BeforeValidator(_integer), Field(ge=1, le=MAX_CHOICES)]
BestOf = Annotated[int | None, BeforeValidator(_integer), Field(ge=1, le=MAX_CHOICES)]
StructuredOutputs = Annotated[tuple[str, str], BeforeValidator(_structured_outputs)]
ResponseFormat = Annotated[tuple[str, str], BeforeValidator(_response_format)]
Truthy = Annotated[bool, BeforeValidator(bool)]   # OpenAI switches read as Python truth, as pdserve always has
Neutral = Any


# ---- refusals as one message ----------------------------------------------------------------------
_LIMITS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le")}


def _given(data, loc: tuple):
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _path(loc: tuple) -> str:
    """'max_tokens' for a top-level field; messages[0].content for one inside it."""
    if len(loc) == 1:
        return f"'{loc[0]}'"
    return str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])


class Schema(BaseModel):
    """A request schema whose refusals are one InvalidInput naming the field (the first found)."""

    @classmethod
    def parse(cls, data: dict, prefix: str = ""):
        """The request validated; otherwise InvalidInput(prefix + what is wrong, the field)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
        if unknown:
            raise InvalidInput(f"{prefix}has unknown key(s) {unknown}; supported: {', '.join(cls.model_fields)}")
        error = errors[0]
        ctx = error.get("ctx") or {}
        loc = error["loc"] or (ctx.get("field"),)
        if error["type"] == "pdserve":
            what = ctx["detail"]
        elif error["type"] in _LIMITS:
            sign, key = _LIMITS[error["type"]]
            what = f"is {_shown(_given(data, loc))}; it must be {sign} {ctx[key]}"
        else:   # a check of pydantic's own: its words
            what = f"is {_shown(_given(data, loc))}: {error['msg']}"
        raise InvalidInput(f"{prefix}{_path(loc)} {what}", str(loc[0]))


# ---- sampling -------------------------------------------------------------------------------------
class SamplingFields(Schema):
    """The sampling settings every door takes, by vLLM's names, with SamplingParams' defaults."""
    max_tokens: MaxTokens = SamplingParams.max_tokens
    temperature: Temperature = SamplingParams.temperature
    top_p: TopP = SamplingParams.top_p
    top_k: TopK = SamplingParams.top_k
    seed: Seed = None
    stop: Stop = ()
    stop_token_ids: StopTokenIds = ()
    ignore_eos: Flag = False
    min_tokens: MinTokens = 0
    presence_penalty: Penalty = SamplingParams.presence_penalty
    frequency_penalty: Penalty = SamplingParams.frequency_penalty
    repetition_penalty: RepetitionPenalty = SamplingParams.repetition_penalty
    logit_bias: LogitBias = ()
    min_p: MinP = SamplingParams.min_p
    bad_words: BadWords = ()   # tokenized by the front end (frontend/prompts.py), banned by the engine
    logprobs: Logprobs = None
    prompt_logprobs: Logprobs = None
    # n sequences returned out of best_of generated (the n with the highest log-probability)
    n: ChoiceCount = SamplingParams.n
    best_of: BestOf = None
    # constrained decoding, as (kind, spec) (engine/structured.py); the engine compiles the spec
    structured_outputs: StructuredOutputs = NO_CONSTRAINT
    response_format: ResponseFormat = NO_CONSTRAINT

    @model_validator(mode="after")
    def _one_constraint(self):
        if self.structured_outputs != NO_CONSTRAINT and self.response_format != NO_CONSTRAINT:
            raise _refuse("and 'structured_outputs' both constrain the output; send one", "response_format")
        return self

    def constraint(self) -> tuple[str, str]:
        """The output's grammar (kind, spec), or NO_CONSTRAINT."""
        return self.response_format if self.response_format != NO_CONSTRAINT else self.structured_outputs

    def max_new_tokens(self) -> int:
        return self.max_tokens

    @model_validator(mode="after")
    def _min_tokens_fit(self):
        if self.min_tokens > self.max_new_tokens():
            raise _refuse(f"is {self.min_tokens}; it must be <= {self.max_new_tokens()}", "min_tokens")
        if self.best_of is not None and self.best_of < self.n:
            raise _refuse(f"is {self.best_of}; it must be >= n ({self.n})", "best_of")
        return self

    def sampling_params(self) -> SamplingParams:
        """Every SamplingParams field this schema declares, as the engine takes it."""
        fields = SamplingParams.__dataclass_fields__
        given = {name: getattr(self, name) for name in type(self).model_fields if name in fields}
        given["max_tokens"] = self.max_new_tokens()
        given["top_k"] = 0 if self.top_k == -1 else self.top_k
        given["structured_kind"], given["structured_spec"] = self.constraint()
        return SamplingParams(**given)


def sibling_params(params: SamplingParams) -> list[SamplingParams]:
    """The engine requests of a request's best_of (or n) sequences: seeds seed, seed + 1, ..., so
    each has its own stream and a seed reproduces them all; when more are generated than
    returned, each reports its tokens' log-probabilities, which rank them."""
    count = params.best_of or params.n
    ranked = count > params.n and params.logprobs is None
    return [dataclasses.replace(params, seed=None if params.seed is None else (params.seed + i) % 2**63,
                                logprobs=0 if ranked else params.logprobs)
            for i in range(count)]


class SamplingParameters(SamplingFields):
    """KServe's `sampling_parameters` (Triton's vLLM backend): a flat JSON object of these keys."""
    model_config = ConfigDict(extra="forbid")
    stream_interval: StreamInterval = SamplingParams.stream_interval


# ---- OpenAI ---------------------------------------------------------------------------------------
def _stream_options(value):
    if not value:
        return {}
    if not isinstance(value, dict):
        raise _refuse('must be an object such as {"include_usage": true}')
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Truthy = False


class OpenAIRequest(SamplingFields):
    """What /v1/completions and /v1/chat/completions share. A field sent as null counts as left out."""
    model_config = ConfigDict(extra="ignore")
    model: str
    stream: Truthy = False
    stream_options: Annotated[StreamOptions, BeforeValidator(_stream_options)] = StreamOptions()
    # not implemented by pdserve: only their neutral values
    suffix: Annotated[Neutral, _only("")] = None
    tools: Annotated[Neutral, _only([])] = None
    use_beam_search: Annotated[Neutral, _only(False)] = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _one_prompt(value):
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if not isinstance(value, str):
        raise _refuse("must be a string (or a list of one string); token-id prompts and several prompts per "
                      "request are not supported")
    return value


class CompletionRequest(OpenAIRequest):
    """`logprobs: k` asks the k most likely alternatives of every token; with `echo`, of the prompt's
    tokens too, and `max_tokens: 0` then scores the prompt alone (as lm-evaluation-harness does)."""
    prompt: Annotated[str, BeforeValidator(_one_prompt)] = Field(None, validate_default=True)
    echo: Truthy = False
    max_tokens: Annotated[int, BeforeValidator(_integer), Field(ge=0, le=INT32_MAX)] = SamplingParams.max_tokens
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _nothing_to_generate_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise _refuse("is 0; it must be >= 1 (0 only with echo, to score the prompt)", "max_tokens")
        return self

    def sampling_params(self) -> SamplingParams:
        """max_tokens 0: the engine still generates one token, which the door leaves out."""
        params = super().sampling_params()
        return dataclasses.replace(params, max_tokens=max(params.max_tokens, 1),
                                   prompt_logprobs=params.logprobs if self.echo else params.prompt_logprobs)


def _text_content(value):
    """A message's content as text: a string, text parts joined, or "" for none."""
    if value is None:
        return ""
    if isinstance(value, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            raise _refuse('may hold only text parts ({"type": "text", "text": ...}): this model is text-only')
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise _refuse("must be a string or a list of text parts")
    return value


class ChatMessage(BaseModel):
    """One message; fields other than role and content go to the chat template as they came."""
    model_config = ConfigDict(extra="allow")
    role: str
    content: Annotated[str, BeforeValidator(_text_content)] = ""

    @model_validator(mode="before")
    @classmethod
    def _has_a_role(cls, data):
        if not isinstance(data, dict) or not isinstance(data.get("role"), str):
            raise _refuse("must be an object with a 'role' and a 'content'")
        return data


def _non_empty_list(value):
    if not isinstance(value, list) or not value:
        raise _refuse('must be a non-empty list of {"role": ..., "content": ...} objects')
    return value


def _tools(value):
    """OpenAI's tools: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    shape = 'must be a list of {"type": "function", "function": {"name": ..., "parameters": {...}}}'
    if not isinstance(value, list):
        raise _refuse(shape)
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(function, dict) or tool.get("type", "function") != "function"
                or not isinstance(function.get("name"), str) or not function["name"]
                or not isinstance(function.get("parameters", {}), (dict, type(None)))):
            raise _refuse(f"[{i}] {shape}")
    return tuple(value)


def _tool_choice(value):
    if value in ("none", "auto", "required"):
        return ToolChoice(value)
    function = value.get("function") if isinstance(value, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return ToolChoice("function", function["name"])
    raise _refuse(f'is {_shown(value)}; it must be "none", "auto", "required" or '
                  '{"type": "function", "function": {"name": ...}}')


class ChatCompletionRequest(OpenAIRequest):
    """`logprobs` is a switch here (OpenAI's chat API), `top_logprobs` the alternatives per token.
    `tool_choice` defaults to auto with tools, none without (frontend/tool_calls.py)."""
    messages: Annotated[list[ChatMessage], BeforeValidator(_non_empty_list)] = Field(None, validate_default=True)
    logprobs: Truthy = False
    top_logprobs: Logprobs = None
    max_tokens: MaxTokens = MAX_TOKENS_UNSET
    max_completion_tokens: Annotated[int | None, BeforeValidator(_integer), Field(ge=1, le=INT32_MAX)] = None
    add_generation_prompt: Annotated[bool, BeforeValidator(lambda v: v is not False)] = True
    # vLLM's default: the chat template writes the special tokens (BOS) itself
    add_special_tokens: bool = False
    tools: Annotated[tuple[dict, ...], BeforeValidator(_tools)] = ()
    tool_choice: Annotated[ToolChoice | None, BeforeValidator(_tool_choice)] = None

    @model_validator(mode="after")
    def _tool_choice_fits_tools(self):
        if self.tool_choice is None:
            self.tool_choice = ToolChoice("auto" if self.tools else "none")
        mode, name = self.tool_choice.mode, self.tool_choice.name
        if mode in ("required", "function") and not self.tools:
            raise _refuse(f"is {mode}; it needs 'tools'", "tool_choice")
        if mode == "function" and name not in {t["function"]["name"] for t in self.tools}:
            raise _refuse(f"names the function {name!r}, which is not in 'tools'", "tool_choice")
        if mode in ("required", "function") and self.constraint() != NO_CONSTRAINT:
            raise _refuse(f"{mode} constrains the output, as 'response_format' does; send one", "tool_choice")
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the output is read for tool calls."""
        return bool(self.tools) and self.tool_choice.mode != "none"

    @model_validator(mode="before")
    @classmethod
    def _max_completion_tokens_first(cls, data):
        """max_completion_tokens supersedes max_tokens (OpenAI's deprecated name), unread when both come."""
        if isinstance(data, dict) and data.get("max_completion_tokens") is not None:
            return {k: v for k, v in data.items() if k != "max_tokens"}
        return data

    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise _refuse(f"is {self.top_logprobs}; it needs \"logprobs\": true", "top_logprobs")
        return self

    def sampling_params(self) -> SamplingParams:
        params = super().sampling_params()
        params = dataclasses.replace(params, logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        schema = forced_schema(self.tools, self.tool_choice)
        return params if schema is None else dataclasses.replace(params, structured_kind="json", structured_spec=schema)

    def chat(self) -> list[dict]:
        """The messages as the chat template reads them."""
        return [m.model_dump() for m in self.messages]


# ---- vLLM's tokenizer endpoints -----------------------------------------------------------------
class TokenizeRequest(Schema):
    """POST /tokenize: a prompt, or chat messages rendered with the model's template (vLLM's)."""
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None   # vLLM's default: yes for a prompt, no for messages (the template writes them)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise _refuse("send either 'prompt' or 'messages'", "prompt")
        if self.add_special_tokens is None:
            self.add_special_tokens = self.messages is None
        return self

    def chat(self) -> list[dict]:
        return [m.model_dump() for m in self.messages]


class DetokenizeRequest(Schema):
    """POST /detokenize: token ids back to text (vLLM's)."""
    model_config = ConfigDict(extra="ignore")
    model: str
    tokens: list[Annotated[int, Field(ge=0, le=INT32_MAX)]]

"""OpenAI request models the router validates before anything reaches an engine.

Every OpenAI sampling field both engines take is checked here, with OpenAI's ranges (and
int64 bounds, so no number overflows an engine's C++ or tensor types); tools' parameter
and response-format schemas must be valid JSON Schema. Other fields (vLLM's and
llama.cpp's own extensions) pass through (`extra="allow"`) to the engine's own protocol
layer, which validates them in full.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args

import jsonschema
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

INT32 = 2**31 - 1  # token ids and counts: llama.cpp reads them as C ints
INT64 = 2**63 - 1
Penalty = Annotated[float, Field(ge=-2, le=2)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


def check_json_schema(schema: dict[str, Any], what: str) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"{what} is not a valid JSON Schema: {exc.message}") from None


class Open(BaseModel):
    # strict: JSON's types as the schema states them (`true` is no number, `"5"` no int)
    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(Open):
    type: Literal["text"]
    text: str


class ImageURL(Open):
    url: str = Field(min_length=1)


class ImagePart(Open):
    type: Literal["image_url"]
    image_url: ImageURL


class MediaPart(Open):
    """Audio and video parts: no tier takes them yet, so routing refuses them by vision."""

    type: Literal["input_audio", "video_url", "image", "video"]


class RefusalPart(Open):
    """An assistant's earlier refusal, as OpenAI returns it, sent back in the history."""

    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImagePart | MediaPart | RefusalPart, Field(discriminator="type")]


Content = str | list[ContentPart]


class MessageBase(Open):
    name: str | None = Field(None, max_length=256)

    def has_image(self) -> bool:
        content = getattr(self, "content", None)
        return isinstance(content, list) and any(
            isinstance(p, ImagePart | MediaPart) for p in content
        )


class InstructionMessage(MessageBase):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(MessageBase):
    role: Literal["user"]
    content: Content


class CalledFunction(Open):
    name: str = Field(min_length=1)
    arguments: str  # a JSON object as text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, v: str) -> str:
        # llama.cpp's template parses them, and fails the request if it cannot
        try:
            if isinstance(json.loads(v), dict):
                return v
        except (ValueError, RecursionError):
            pass
        raise ValueError("arguments must be a JSON object, as text")


class ToolCall(Open):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(MessageBase):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(MessageBase):
    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(min_length=1, max_length=256)


Message = Annotated[
    InstructionMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


def union_tags(union: Any, field: str) -> set[str]:
    """The values of `field`'s Literal over the members of a tagged union."""
    members = get_args(get_args(union)[0])  # Annotated[A | B, ...] -> (A, B)
    return {tag for m in members for tag in get_args(m.model_fields[field].annotation)}


# The tags a tagged union puts in an error's location after the item's index.
UNION_TAGS = frozenset(union_tags(Message, "role") | union_tags(ContentPart, "type"))


class FunctionDef(Open):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_json_schema(v, "function.parameters")
        return v


class Tool(Open):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(Open):
    include_usage: bool | None = None


class JsonSchemaFormat(Open):
    name: Name
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(v, "response_format.json_schema.schema")
        return v


class ResponseFormat(Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs json_schema")
        return self


class Sampling(Open):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    top_k: int | None = Field(None, ge=-1, le=INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(None, ge=0, le=INT32)
    ignore_eos: bool | None = None
    user: str | None = Field(None, max_length=512)
    # the band to serve it in (`pipeline/bands.py`): the router's, never the engine's
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("at most 1024 logit_bias entries")
        for token, bias in v.items():
            if not token.isdigit() or int(token) > INT32:
                raise ValueError(f"logit_bias key {token[:32]!r} is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values must be between -100 and 100")
        return v

    @model_validator(mode="after")
    def _stream_options(self) -> Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's name: thinking mode closes its reasoning after this many tokens (every tier)
    thinking_token_budget: int | None = Field(None, ge=1, le=INT32)

    @model_validator(mode="after")
    def _tool_choice(self) -> ChatRequest:
        choice = self.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or not name:
                raise ValueError("tool_choice object must be {type: function, function: {name}}")
            if not any(t.function.name == name for t in self.tools or ()):
                raise ValueError(f"tool_choice names {name!r}, which is not in tools")
        if choice in ("required",) and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tool function names must be unique")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def thinking(self) -> bool:
        return bool((self.chat_template_kwargs or {}).get("thinking", True))

    @property
    def wants_vision(self) -> bool:
        return any(m.has_image() for m in self.messages)

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Text = Annotated[str, StringConstraints(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT32)]], Field(min_length=1)]


class CompletionRequest(Sampling):
    # a prompt, or a batch of them; none may be empty
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens


def canonical_body(parsed: BaseModel) -> dict[str, Any]:
    """What goes on to an engine: the fields the client set, as validated, its extra
    fields unchanged; without null fields in messages (but content) and tools, which
    vLLM's and llama.cpp's parsers refuse (`"name": null`, `"description": null`)."""
    body = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    body.pop("service_tier", None)
    if isinstance(parsed, ChatRequest):
        body["messages"] = [without_nulls(m, keep="content") for m in body["messages"]]
        if body.get("tools"):
            body["tools"] = [
                {**without_nulls(t), "function": without_nulls(t["function"])}
                for t in body["tools"]
            ]
    return body


def without_nulls(fields: dict[str, Any], keep: str | None = None) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None or k == keep}

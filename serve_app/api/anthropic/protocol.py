"""Anthropic Messages API request models, as validated before anything reaches the
pipeline. Fields the API defines and we have no use for (`cache_control`, `citations`,
`container`...) are accepted and ignored, as agent CLIs send them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from serve_app.canonical import INT32, check_json_schema


class Block(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextBlock(Block):
    type: Literal["text"]
    text: str


class Base64Source(Block):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class UrlSource(Block):
    type: Literal["url"]
    url: str = Field(min_length=1)


class ImageBlock(Block):
    type: Literal["image"]
    source: Annotated[Base64Source | UrlSource, Field(discriminator="type")]

    def url(self) -> str:
        src = self.source
        return src.url if isinstance(src, UrlSource) else f"data:{src.media_type};base64,{src.data}"


class ToolUseBlock(Block):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=128)
    input: dict[str, Any]


class ToolResultBlock(Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] = ""
    is_error: bool = False


class ThinkingBlock(Block):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Block):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class MessageParam(Block):
    # Claude Code puts system text inside `messages` too
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


ToolName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
]


class ToolParam(Block):
    name: ToolName
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    @model_validator(mode="after")
    def _schema(self) -> ToolParam:
        check_json_schema(self.input_schema, "input_schema")
        return self


class ToolChoice(Block):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice: name goes with type 'tool', and only with it")
        return self


Display = Literal["summarized", "omitted"]


class ThinkingEnabled(Block):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1, le=INT32)
    display: Display | None = None  # omitted: thinking blocks carry only their signature


class ThinkingDisabled(Block):
    type: Literal["disabled"]


class ThinkingAdaptive(Block):
    """Thinking on, its budget the server's pick (from `output_config.effort`)."""

    type: Literal["adaptive"]
    display: Display | None = None


class OutputConfig(Block):
    effort: Literal["low", "medium", "high", "max"] | None = None


Thinking = Annotated[
    ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive, Field(discriminator="type")
]


class Metadata(Block):
    user_id: str | None = Field(None, max_length=512)


class Conversation(Block):
    """What a request says and offers: shared by messages and count_tokens."""

    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # Anthropic's: `auto` is the plan's band (which may be priority), `standard_only` not
    service_tier: Literal["auto", "standard_only"] | None = None

    @model_validator(mode="after")
    def _tools(self) -> Conversation:
        names = [t.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: names must be unique")
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice: type '{choice.type}' needs tools")
        if choice is not None and choice.name is not None and choice.name not in names:
            raise ValueError(f"tool_choice: names {choice.name!r}, which is not in tools")
        return self


class MessagesRequest(Conversation):
    max_tokens: int = Field(ge=1, le=INT32)
    stop_sequences: list[str] | None = Field(None, max_length=16)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=INT32)
    metadata: Metadata | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _budget(self) -> MessagesRequest:
        thinking = self.thinking
        if isinstance(thinking, ThinkingEnabled) and thinking.budget_tokens >= self.max_tokens:
            raise ValueError("thinking.budget_tokens: must be less than max_tokens")
        return self


class CountTokensRequest(Conversation):
    pass


# Anthropic's service tier asked for, in OpenAI's words (`pipeline/bands.py`), and
# Anthropic's words for the band served (its `usage.service_tier`)
ANTHROPIC_ASKED = {"auto": "auto", "standard_only": "default"}
ANTHROPIC_WORDS = {"default": "standard", "flex": "batch", "priority": "priority"}


def thinking_omitted(req: Conversation) -> bool:
    return getattr(req.thinking, "display", None) == "omitted"


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """Every non-2xx answer on `/v1/messages`, as Anthropic shapes it."""

    type: Literal["error"]
    error: AnthropicErrorDetail

"""The Responses and Conversations APIs' request bodies, as OpenAI documents them.

Input items are a union told apart by `type` (a message may leave it out). Fields we
take but that change nothing here are named, so a field no tier could honour (a stored
prompt, an input item of a hosted tool) is refused with its name rather than silently
ignored. Hosted tools an agent offers alongside its functions (Codex's `web_search`) are
taken but not shown to the model, and the answer names them; forcing one is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
)

from serve_app.canonical import INT32, Name, check_json_schema


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Loose(BaseModel):
    """Items clients send back as they got them: fields beyond what translation needs
    (`status`, `annotations`, `phase`...) are kept, so items list back as they came."""

    model_config = ConfigDict(extra="allow", strict=True)


# ---- content parts ---------------------------------------------------------------------


class InputText(Loose):
    type: Literal["input_text"]
    text: str


class InputImage(Loose):
    type: Literal["input_image"]
    image_url: str | None = Field(None, min_length=1)
    file_id: str | None = None
    detail: Literal["low", "high", "auto", "original"] = "auto"


class OutputText(Loose):
    type: Literal["output_text"]
    text: str


class Refusal(Loose):
    type: Literal["refusal"]
    refusal: str


class InputFile(Loose):
    type: Literal["input_file"]


Part = Annotated[
    InputText | InputImage | OutputText | Refusal | InputFile, Field(discriminator="type")
]


# ---- input items -----------------------------------------------------------------------


class MessageItem(Loose):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]


class FunctionCallItem(Loose):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1, max_length=256)
    name: Name
    namespace: Name | None = None  # a call of a namespace tool's member
    arguments: str


class FunctionCallOutputItem(Loose):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[Part]


class ReasoningText(Loose):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(Loose):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


class ItemReference(Loose):
    type: Literal["item_reference"]
    id: str = Field(min_length=1)


ITEM_KINDS = (
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
    "item_reference",
)


def item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else "message"
    return kind if kind in ITEM_KINDS else "unknown"


class UnknownItem(Loose):
    # (its schema excludes the known kinds, so a known item matches one branch only)
    type: str = Field(json_schema_extra={"not": {"enum": list(ITEM_KINDS)}})

    @field_validator("type")
    @classmethod
    def _refused(cls, v: str) -> str:
        raise ValueError(f"input items of type {v!r} are not supported")


class HostedTool(Loose):
    """A hosted tool (web search, file search, code interpreter...): nothing here runs it,
    so the model is not shown it (`x-kimi-tools-not-run` names it in the answer)."""

    type: str = Field(min_length=1, json_schema_extra={"not": {"const": "function"}})


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")]
    | Annotated[UnknownItem, Tag("unknown")],
    Discriminator(item_kind),
]


# ---- the request -----------------------------------------------------------------------


class FunctionTool(Strict):
    type: Literal["function"]
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_json_schema(v, "parameters")
        return v


def in_namespace(namespace: str, name: str) -> str:
    """The one name the model sees for a namespace tool's member."""
    return f"{namespace}.{name}"


class NamespaceTool(Strict):
    """A named group of function tools (Codex sends its sub-agent tools so). The model
    sees each as `NAMESPACE.NAME`; its calls come back as `name` plus `namespace`."""

    type: Literal["namespace"]
    name: Name
    description: str | None = None
    tools: list[FunctionTool] = Field(min_length=1)

    def flat(self) -> list[FunctionTool]:
        return [t.model_copy(update={"name": in_namespace(self.name, t.name)}) for t in self.tools]


def tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if kind in ("function", "namespace") else "other"


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")]
    | Annotated[NamespaceTool, Tag("namespace")]
    | Annotated[HostedTool, Tag("other")],
    Discriminator(tool_kind),
]


class NamedFunction(Strict):
    type: Literal["function"]
    name: Name


class Reasoning(Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Name | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_json_schema(v, "text.format.schema")
        return v


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ConversationRef(Strict):
    id: str = Field(min_length=1)


class StreamOptions(Strict):
    include_obfuscation: bool | None = None


Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]

INCLUDABLE = Literal[
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
    "message.input_image.image_url",
]


class ResponsesRequest(Strict):
    model: str = Field(min_length=1)
    input: str | list[Item] | None = None
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    metadata: Metadata | None = Field(None, max_length=16)
    prompt_cache_key: str | None = Field(None, max_length=200)
    # what the client says about itself (Codex: its turn and window ids); not the model's
    client_metadata: dict[str, Annotated[str, Field(max_length=16384)]] | None = Field(
        None, max_length=32
    )
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1)
    conversation: str | ConversationRef | None = None
    background: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    include: list[INCLUDABLE] | None = None
    user: str | None = Field(None, max_length=512)
    safety_identifier: str | None = Field(None, max_length=512)
    service_tier: Literal["auto", "default", "flex", "priority", "scale"] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _not_hosted(cls, v: Any) -> Any:
        kind = v.get("type") if isinstance(v, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise ValueError(
                f"tool_choice forces the hosted tool {kind!r}, which this server does not"
                " run; force a function tool, or use auto"
            )
        return v

    @property
    def function_tools(self) -> list[FunctionTool]:
        """The tools the model is shown, namespaces' members flattened."""
        out: list[FunctionTool] = []
        for t in self.tools or ():
            if isinstance(t, FunctionTool):
                out.append(t)
            elif isinstance(t, NamespaceTool):
                out.extend(t.flat())
        return out

    @property
    def namespaced(self) -> dict[str, tuple[str, str]]:
        """Flattened name -> (namespace, name), to restore in the output."""
        return {
            in_namespace(t.name, m.name): (t.name, m.name)
            for t in self.tools or ()
            if isinstance(t, NamespaceTool)
            for m in t.tools
        }

    @property
    def hosted_tools(self) -> list[str]:
        """The hosted tools offered, which the model is not shown."""
        return [t.type for t in self.tools or () if isinstance(t, HostedTool)]

    @property
    def conversation_id(self) -> str | None:
        c = self.conversation
        return c.id if isinstance(c, ConversationRef) else c


# ---- conversations ---------------------------------------------------------------------


class ConversationCreate(Strict):
    items: list[Item] | None = Field(None, max_length=20)
    metadata: Metadata | None = Field(None, max_length=16)


class ConversationUpdate(Strict):
    metadata: Metadata = Field(max_length=16)


class ItemsCreate(Strict):
    items: list[Item] = Field(min_length=1, max_length=20)

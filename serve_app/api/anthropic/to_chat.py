"""An Anthropic Messages request as the canonical OpenAI chat request, pure.

Requests: system and content blocks become chat messages (`tool_result` blocks become
tool messages ahead of the user's other blocks, as OpenAI orders them), tools and
`tool_choice` their OpenAI forms, `thinking` K2.5's thinking or instant mode with a
thinking budget. The answer goes back through `events.py`: a chat completion becomes
a message (thinking, text and `tool_use` blocks), a chunk stream Anthropic's events.

Tool-use ids carry the engine's call id (`functions.get_weather:0`, the form K2.5 was
trained on), encoded into Anthropic's `toolu_` form and decoded when it comes back, so
the conversation the model sees keeps its own ids.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from serve_app.api.anthropic.protocol import (
    ContentBlock,
    Conversation,
    ImageBlock,
    MessagesRequest,
    TextBlock,
    ThinkingAdaptive,
    ThinkingBlock,
    ThinkingEnabled,
    ToolResultBlock,
    ToolUseBlock,
)
from serve_app.reasoning.sealing import Sealer
from serve_app.reasoning.thinking import effort_budget
from serve_app.reasoning.thinking import thinking_fields as thinking_mode

TOOLU = "toolu_"


def tool_use_id(call_id: str) -> str:
    return TOOLU + base64.urlsafe_b64encode(call_id.encode()).decode().rstrip("=")


def call_id(tool_use: str) -> str:
    """The engine's call id behind one of our `toolu_` ids; any other id as it is."""
    if not tool_use.startswith(TOOLU):
        return tool_use
    raw = tool_use[len(TOOLU) :]
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return tool_use
    return decoded if decoded.startswith("functions.") else tool_use


# ---- request --------------------------------------------------------------------------


def chat_body(req: Conversation, sealer: Sealer) -> dict[str, Any]:
    """The OpenAI chat body that says what `req` says (validated again as a ChatRequest)."""
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req, sealer)}
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    "parameters": t.input_schema,
                },
            }
            for t in req.tools
        ]
        body.update(tool_choice(req))
    body.update(thinking_fields(req))
    if isinstance(req, MessagesRequest):
        body.update(sampling(req))
    return body


def thinking_fields(req: Conversation) -> dict[str, Any]:
    """K2.5's thinking or instant mode, and the thinking budget. Anthropic's default is no
    extended thinking, so instant mode unless asked; adaptive thinking gets a budget
    from the effort asked (high if none)."""
    thinking = req.thinking
    if isinstance(thinking, ThinkingEnabled):
        return thinking_mode(True, thinking.budget_tokens)
    if isinstance(thinking, ThinkingAdaptive) and isinstance(req, MessagesRequest):
        effort = (req.output_config.effort if req.output_config else None) or "high"
        return thinking_mode(True, effort_budget(effort, req.max_tokens))
    return thinking_mode(isinstance(thinking, ThinkingAdaptive))


def sampling(req: MessagesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {"max_tokens": req.max_tokens, "stream": req.stream}
    if req.stream:  # the stream ends with the message's usage
        fields["stream_options"] = {"include_usage": True}
    if req.stop_sequences:
        fields["stop"] = req.stop_sequences
    for name in ("temperature", "top_p", "top_k"):
        if (value := getattr(req, name)) is not None:
            fields[name] = value
    if req.metadata is not None and req.metadata.user_id:
        fields["user"] = req.metadata.user_id
    return fields


def tool_choice(req: Conversation) -> dict[str, Any]:
    choice = req.tool_choice
    if choice is None:
        return {}
    fields: dict[str, Any] = {}
    if choice.type == "tool":
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use:
        fields["parallel_tool_calls"] = False
    return fields


def chat_messages(req: Conversation, sealer: Sealer) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": text_of(req.system)})
    for message in req.messages:
        if message.role == "system":
            out.append({"role": "system", "content": text_of(message.content)})
        elif isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "user":
            out.extend(user_turn(message.content))
        else:
            out.append(assistant_turn(message.content, sealer))
    return out


def text_of(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "\n\n".join(b.text for b in content if isinstance(b, TextBlock))


def parts(blocks: list[Any]) -> list[dict[str, Any]]:
    """Text and image blocks as OpenAI content parts."""
    out: list[dict[str, Any]] = []
    for b in blocks:
        if isinstance(b, TextBlock):
            out.append({"type": "text", "text": b.text})
        elif isinstance(b, ImageBlock):
            out.append({"type": "image_url", "image_url": {"url": b.url()}})
    return out


def user_turn(blocks: list[ContentBlock]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for b in blocks:
        if isinstance(b, ToolResultBlock):
            content = b.content if isinstance(b.content, str) else parts(b.content)
            if b.is_error:
                prefix = "The tool reported an error:\n"
                content = (
                    prefix + content
                    if isinstance(content, str)
                    else [{"type": "text", "text": prefix}, *content]
                )
            out.append({"role": "tool", "tool_call_id": call_id(b.tool_use_id), "content": content})
    rest = parts(blocks)
    if rest:
        out.append({"role": "user", "content": rest})
    return out


def assistant_turn(blocks: list[ContentBlock], sealer: Sealer) -> dict[str, Any]:
    text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
    turn: dict[str, Any] = {"role": "assistant", "content": text}
    thinking = "".join(reasoning(b, sealer) for b in blocks if isinstance(b, ThinkingBlock))
    if thinking:
        turn["reasoning_content"] = thinking
    calls = [
        {
            "id": call_id(b.id),
            "type": "function",
            "function": {"name": b.name, "arguments": json.dumps(b.input)},
        }
        for b in blocks
        if isinstance(b, ToolUseBlock)
    ]
    if calls:
        turn["tool_calls"] = calls
    return turn  # redacted thinking is another model's, unreadable here: left out


def reasoning(block: ThinkingBlock, sealer: Sealer) -> str:
    """The reasoning a thinking block brings back: what its signature seals (K2.5's own,
    whether or not the client kept the text); none if the signature is not ours (another
    server's, altered, too old); the text itself where no signature came."""
    if not block.signature:
        return block.thinking
    return sealer.open(block.signature) or ""


# ---- answer ---------------------------------------------------------------------------

"""What a tier replica needs to know about its engine: the pydantic boundary between the
application's catalogue and the engine deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EngineKind = Literal["vllm", "llama.cpp"]
# At most 1/THINKING_SHARE of max_tokens goes to reasoning before a forced call or JSON.
THINKING_SHARE = 4


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Artifact(Strict):
    """Where the weights come from.

    `embedded` builds the tiny Kimi-architecture model locally (`quant` picks a GGUF
    quantization of it); `huggingface` names a hub repo (and `file` inside it for GGUF),
    fetched by the engine on production nodes; `path` is a local directory or file.
    `mmproj` is a GGUF tier's vision projector file (built for `embedded`).
    """

    kind: Literal["embedded", "huggingface", "path"]
    repo: str | None = None
    file: str | None = None
    path: Path | None = None
    quant: str | None = None
    mmproj: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> Artifact:
        if self.kind == "huggingface" and not self.repo:
            raise ValueError("artifact.repo is required when kind is 'huggingface'")
        if self.kind == "path" and self.path is None:
            raise ValueError("artifact.path is required when kind is 'path'")
        return self


class Capabilities(Strict):
    tools: bool = True
    thinking: bool = True
    vision: bool = False
    json_schema: bool = True


class Autoscaling(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    # 1 -> 0 replicas (min_replicas 0); None uses downscale_delay_s.
    downscale_to_zero_delay_s: float | None = Field(None, ge=0)
    # How often replicas and handles report their figures, and the window they average.
    metrics_interval_s: float = Field(2.0, gt=0)
    look_back_period_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must not exceed max_replicas")
        return self


class Resources(Strict):
    """Per-replica Ray resources. Custom resources stand for node types (e.g. `h200`,
    `host_ram_gb`) so Ray places each tier on the nodes that can hold it."""

    num_cpus: float = Field(0, ge=0)
    num_gpus: float = Field(0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    custom: dict[str, float] = Field(default_factory=dict)
    # Engines with several GPUs per replica (TP 8) get a placement group bundle each.
    placement_bundles: list[dict[str, float]] | None = None


class HoldBack(Strict):
    """How long a tier replica may hold a stream's tokens so that they cross the Ray hops
    (tier -> router -> proxy) as one message: each message costs about the same CPU however
    many tokens it carries, and on a busy replica that CPU is taken from the engine.

    The window grows with the streams the replica relays: `min_ms` with one (the latency a
    lone client sees; at most 10 ms), `per_stream_ms` more for each other, up to `max_ms`.
    The first output of a stream is never held (time to first token).
    """

    min_ms: float = Field(4.0, ge=0, le=10)
    per_stream_ms: float = Field(2.0, ge=0)
    max_ms: float = Field(50.0, ge=0, le=1000)

    def window_s(self, streams: int) -> float:
        ms = self.min_ms + self.per_stream_ms * max(streams - 1, 0)
        return min(ms, max(self.max_ms, self.min_ms)) / 1000


class TierSpec(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    engine: EngineKind
    artifact: Artifact
    max_context: int = Field(gt=0, description="context window the tier serves, in tokens")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="engine command-line flags without leading dashes; true = bare flag",
    )
    env: dict[str, str] = Field(default_factory=dict)
    capabilities: Capabilities = Capabilities()
    # What `/v1/models` says of the weights; by default the GGUF quant or the dtype.
    quantization: str | None = None
    resources: Resources = Resources()
    autoscaling: Autoscaling = Autoscaling()
    # Forced tool calls and JSON answers in thinking mode close the reasoning after this
    # many tokens, so the call or the JSON is reached; None leaves it open.
    forced_tool_thinking_budget: int | None = Field(64, ge=0)
    hold_back: HoldBack = HoldBack()
    startup_timeout_s: float = Field(600, gt=0)

    @model_validator(mode="after")
    def _vision_weights(self) -> TierSpec:
        gguf_vision = self.engine == "llama.cpp" and self.capabilities.vision
        if gguf_vision and self.artifact.kind != "embedded" and self.artifact.mmproj is None:
            raise ValueError(
                f"tier {self.name!r} says vision: true; a llama.cpp tier needs artifact.mmproj"
            )
        return self

    @property
    def model_id(self) -> str:
        return f"kimi-k2.5:{self.name}"

    @property
    def quantization_label(self) -> str | None:
        engine_says = self.engine_args.get("quantization") or self.engine_args.get("dtype")
        return self.quantization or self.artifact.quant or engine_says

    def thinking_budget(self, max_tokens: int | None) -> int | None:
        """Reasoning tokens a forced call or JSON answer may spend: the configured budget,
        cut to a quarter of `max_tokens` so that the call itself still fits."""
        budget = self.forced_tool_thinking_budget
        if budget is None or max_tokens is None:
            return budget
        return min(budget, max_tokens // THINKING_SHARE)


def flags_to_argv(flags: dict[str, Any]) -> list[str]:
    """`{"max-model-len": 4096, "enable-auto-tool-choice": True}` -> CLI argv."""
    argv: list[str] = []
    for key, value in flags.items():
        flag = key if key.startswith("-") else f"--{key}"
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (dict, list)):
            import json

            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv

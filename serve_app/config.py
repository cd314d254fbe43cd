"""The application's configuration: the tier catalogue and the price plans.

Loaded once from the application args in serve_config.yaml and validated at build time;
a bad config fails `serve run`/`serve deploy` with the offending field named.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.spec import TierSpec

BASE_MODEL = "kimi-k2.5"
Strategy = Literal["load", "plan_only", "random"]
ServiceTier = Literal["default", "flex", "priority"]  # OpenAI's bands, as served


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_per_mtok: float = Field(ge=0, description="USD per 1M prompt tokens")
    output_per_mtok: float = Field(ge=0, description="USD per 1M completion tokens")
    cached_input_per_mtok: float | None = Field(None, ge=0)

    def cost(self, prompt: int, completion: int, cached: int = 0) -> float:
        cached_rate = self.cached_input_per_mtok
        if cached_rate is None:
            cached_rate = self.input_per_mtok
        fresh = max(prompt - cached, 0)
        return (
            fresh * self.input_per_mtok + cached * cached_rate + completion * self.output_per_mtok
        ) / 1e6


class Slo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_ms: float | None = Field(
        None,
        gt=0,
        description="time to first token (p90 over the last ~30 s) the tier should hold;"
        " above it, plans that may degrade spill to their next tier",
    )


class FairShare(BaseModel):
    """The queue in front of a tier (`routing/fair_queue.py`): how many requests it
    keeps in flight. Alone, a key gets the engines' whole capacity (what they report
    running at once); while several keys are active, `shared_in_flight` per replica of
    the tier, so a newcomer joins a small batch instead of a swarm's."""

    model_config = ConfigDict(extra="forbid")
    shared_in_flight: int = Field(8, ge=1, description="per tier replica, several keys active")
    max_queued: int = Field(
        2000,
        ge=1,
        description="requests waiting at the routers for the tier; past it, a key holding"
        " its part of the queue gets 429",
    )


class TierEntry(TierSpec):
    price: Price
    slo: Slo = Slo()
    fair_share: FairShare = FairShare()
    node_type: str | None = Field(
        None, description="the node type it runs on (cluster/node_types.yaml), for `plan`"
    )


class LimitFields(BaseModel):
    """The limits a plan sets and a key may override (None = no limit / the plan's)."""

    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0)
    monthly_token_budget: int | None = Field(None, gt=0)
    monthly_spend_usd: float | None = Field(None, gt=0)
    max_session_tokens: int | None = Field(
        None, gt=0, description="tokens one agent session may use; past it 402"
    )
    max_session_spend_usd: float | None = Field(
        None, gt=0, description="spend one agent session may run up; past it 402"
    )
    max_concurrent_per_session: int | None = Field(
        None, gt=0, description="requests of one agent session in flight at once; past it 429"
    )
    max_output_tokens: int | None = Field(None, gt=0)
    request_timeout_s: float | None = Field(
        None, gt=0, description="whole-request time limit; past it 504 (or an error event)"
    )


class Plan(LimitFields):
    tiers: list[str] = Field(min_length=1, description="allowed tiers, most preferred first")
    allow_pin: bool = Field(True, description="may ask for kimi-k2.5:<tier> directly")
    allow_degrade: bool = Field(False, description="may be served by a later tier under load")
    priority: int = Field(0, description="higher is shed later when the cluster saturates")
    weight: float = Field(
        1.0, gt=0, description="share of a saturated tier against other plans' keys (fair queue)"
    )
    service_tiers: list[Literal["flex", "priority"]] = Field(
        default_factory=lambda: ["flex"],
        description="bands besides `default` its requests may ask for; others get `default`",
    )
    default_service_tier: ServiceTier = Field(
        "default", description="the band of a request that asks for none, or for `auto`"
    )


class Band(BaseModel):
    """A service tier (OpenAI's `service_tier`): a price and a fair-queue weight,
    relative to the tier's and the plan's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    price_factor: float = Field(gt=0, description="multiplies the serving tier's prices")
    weight_factor: float = Field(gt=0, description="multiplies the plan's fair-queue weight")


class ServiceTiers(BaseModel):
    """The bands a request may ask for besides `default` (which is the tier's price and
    the plan's weight): `flex` for work that may wait (swarms, batch), `priority` for
    work that may not."""

    model_config = ConfigDict(extra="forbid")
    flex: Band = Band(price_factor=0.5, weight_factor=0.25)
    priority: Band = Band(price_factor=2.0, weight_factor=4.0)

    def band(self, name: ServiceTier) -> Band:
        return DEFAULT_BAND if name == "default" else getattr(self, name)


DEFAULT_BAND = Band(price_factor=1.0, weight_factor=1.0)


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_replicas: int = Field(1, ge=1)
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="router replicas on one node at most; 1 keeps a router alive when a node "
        "is lost (unset on a one-node cluster, where it would leave replicas unplaced)",
    )
    max_body_bytes: int = Field(
        20 * 2**20, gt=0, description="a request body; inline images count against it"
    )
    anonymous_plan: str | None = Field(
        "enterprise", description="plan for requests without a key; null requires keys"
    )
    load_refresh_s: float = Field(0.5, gt=0, description="how often tier loads are read")
    overload_pressure: float = Field(
        1.0, gt=0, description="(running + waiting) / capacity above which a tier spills"
    )
    shed_pressure: float = Field(2.0, gt=0, description="above this, low plans are shed")
    shed_below_priority: int = Field(1, description="plans below this priority shed first")
    strategy: Strategy = Field("load", description="tier choice: load (the product), or a baseline")
    clamp_messages_max_tokens: bool = Field(
        True,
        description="/v1/messages lowers max_tokens past the plan's or tiers' limit to it"
        " (agent CLIs ask for more); false refuses it in Anthropic's own words",
    )
    fair_queue: Literal["fair", "first_come", "off"] = Field(
        "fair",
        description="requests wait at the router while a tier is full: in fair-share order"
        " (fair), in arrival order (first_come, the baseline), or not at all (off: the"
        " engines' own queues)",
    )
    stream_stall_s: float = Field(
        10.0,
        gt=0,
        description="a stream whose tier replica sends nothing this long while it is missing"
        " from the load board (its process or node silent) ends with a retryable error",
    )
    max_queue_wait_s: float = Field(
        120.0, gt=0, description="past this (or the plan's time limit) a waiting request gets 503"
    )
    allow_strategy_header: bool = Field(
        False,
        description="honour x-kimi-routing-strategy per request (benchmarks compare baselines)",
    )
    trusted_proxies: list[str] = Field(
        ["127.0.0.0/8", "::1/128"],
        description="networks whose X-Forwarded-For is believed: the client's address (for"
        " throttling credential guesses) is the last one not in them. Put your load"
        " balancer's here; Ray's HAProxy adds no X-Forwarded-For of its own",
    )


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state_dir: str | None = Field(
        None, description="keys and usage; default $KIMI_SERVE_STATE or ~/.local/share/kimi-serve"
    )
    admin_token_env: str = Field(
        "KIMI_SERVE_ADMIN_TOKEN", description="env var holding the admin API credential"
    )
    meter_batch_size: int = Field(200, gt=0, description="records per Parquet file at most")
    meter_flush_interval_s: float = Field(5.0, gt=0)
    default_output_estimate: int = Field(
        1024, gt=0, description="tokens charged on admission when max_tokens is absent"
    )
    restart_wait_s: float = Field(
        10.0, gt=0, description="how long requests wait for a restarting gateway; then 503"
    )


class OutboundPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="only these hosts (exact, or *.domain); empty: any public host."
        " A host listed here may resolve to a private address",
    )
    allow_http: bool = Field(False, description="plain http as well as https")


class RemoteImages(OutboundPolicy):
    """Images given by http(s) URL: fetched by the router (never by an engine), only from
    allow-listed hosts, each redirect checked again."""

    enabled: bool = Field(False, description="off: only data: URLs are taken")
    max_redirects: int = Field(3, ge=0)
    timeout_s: float = Field(10.0, gt=0, description="whole fetch, redirects included")

    @model_validator(mode="after")
    def _listed(self) -> RemoteImages:
        if self.enabled and not self.allowed_hosts:
            raise ValueError("media.remote.enabled needs allowed_hosts")
        return self


class ImageTokens(BaseModel):
    """How an image becomes tokens in K2.5's preprocessing (its preprocessor_config):
    scaled to fit `max_patches` patches and `max_patches_per_side`, padded to whole merged
    patches, one token per `merge`x`merge` patches. The router counts with it before
    routing; the engine's own count settles the bill."""

    model_config = ConfigDict(extra="forbid")
    patch_size: int = Field(14, gt=0)
    merge: int = Field(2, gt=0)
    max_patches: int = Field(16384, gt=0)
    max_patches_per_side: int = Field(512, gt=0)
    wrapper_tokens: int = Field(8, ge=0, description="the media markers around each image")


class MediaSettings(BaseModel):
    """What image input a deployment takes (checked before any engine sees a request)."""

    model_config = ConfigDict(extra="forbid")
    max_images: int = Field(8, ge=0, description="images per request")
    max_image_bytes: int = Field(10 * 2**20, gt=0, description="bytes of one image, decoded")
    max_pixels: int = Field(25_000_000, gt=0, description="width x height of one image")
    formats: list[Literal["PNG", "JPEG", "WEBP", "GIF"]] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF"],
        description="GIFs give their first frame",
    )
    remote: RemoteImages = RemoteImages()
    tokens: ImageTokens = ImageTokens()


class SamplingDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(ge=0, le=2)
    top_p: float = Field(gt=0, le=1)


class GenerationDefaults(BaseModel):
    """Sampling the model card recommends, applied where a request sets none."""

    model_config = ConfigDict(extra="forbid")
    thinking: SamplingDefaults = SamplingDefaults(temperature=1.0, top_p=0.95)
    instant: SamplingDefaults = SamplingDefaults(temperature=0.6, top_p=0.95)


class ConsoleSettings(BaseModel):
    """The web console at /console: key holders' usage, operators' tiers and keys."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="off unless a deployment turns it on")
    session_ttl_s: float = Field(3600, gt=0, description="a sign-in lasts this long")
    recent_requests: int = Field(50, gt=0, le=1000, description="rows in the requests table")
    dashboard_url: str | None = Field(
        None, description="the Ray dashboard the console links to (default: :8265 of its host)"
    )


class WebhookSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outbound: OutboundPolicy = OutboundPolicy()
    retry_base_s: float = Field(5.0, gt=0, description="first retry after this; doubling")
    max_attempts: int = Field(10, ge=1, description="deliveries tried at most, then dropped")
    timeout_s: float = Field(10.0, gt=0, description="per delivery attempt")


class SessionSettings(BaseModel):
    """The store of responses and conversations (`/v1/responses`, `/v1/conversations`),
    in the gateway's state dir."""

    model_config = ConfigDict(extra="forbid")
    ttl_days: float = Field(30, gt=0, description="stored responses and conversations expire")
    quota_mb_per_key: float = Field(
        256, gt=0, description="bytes a key may store; its oldest responses are evicted past it"
    )
    sweep_interval_s: float = Field(300, gt=0, description="how often expired rows are deleted")
    webhooks: WebhookSettings = WebhookSettings()

    @property
    def quota_bytes(self) -> int:
        return int(self.quota_mb_per_key * 2**20)


class ModelAlias(BaseModel):
    """A model name clients send (agent CLIs send their own) and the model it means."""

    model_config = ConfigDict(extra="forbid")
    pattern: str = Field(min_length=1, description="shell-style, case-insensitive: claude-*")
    model: str = Field(description="kimi-k2.5, or kimi-k2.5:<tier> to prefer that tier")


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tiers: list[TierEntry] = Field(min_length=1)
    plans: dict[str, Plan]
    router: RouterSettings = RouterSettings()
    gateway: GatewaySettings = GatewaySettings()
    sessions: SessionSettings = SessionSettings()
    media: MediaSettings = MediaSettings()
    generation_defaults: GenerationDefaults = GenerationDefaults()
    service_tiers: ServiceTiers = ServiceTiers()
    console: ConsoleSettings = ConsoleSettings()
    model_aliases: list[ModelAlias] = Field(
        default_factory=list, description="first match wins; our own names never match"
    )

    @model_validator(mode="after")
    def _consistent(self) -> AppConfig:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tiers: duplicate tier names in {names}")
        for plan_name, plan in self.plans.items():
            for tier in plan.tiers:
                if tier not in names:
                    raise ValueError(f"plans.{plan_name}.tiers: unknown tier {tier!r}")
        for plan_name, plan in self.plans.items():
            band = plan.default_service_tier
            if band != "default" and band not in plan.service_tiers:
                raise ValueError(
                    f"plans.{plan_name}.default_service_tier: {band!r} is not in its service_tiers"
                )
        anon = self.router.anonymous_plan
        if anon is not None and anon not in self.plans:
            raise ValueError(f"router.anonymous_plan: unknown plan {anon!r}")
        ours = {BASE_MODEL, *(t.model_id for t in self.tiers)}
        for i, alias in enumerate(self.model_aliases):
            if alias.model not in ours:
                raise ValueError(f"model_aliases.{i}.model: unknown model {alias.model!r}")
        return self

    def alias(self, model: str) -> str | None:
        """The model an alias maps `model` to, if it is not one of ours and one matches."""
        if model == BASE_MODEL or model.startswith(f"{BASE_MODEL}:"):
            return None
        name = model.lower()
        return next(
            (a.model for a in self.model_aliases if fnmatch.fnmatchcase(name, a.pattern.lower())),
            None,
        )

    def tier(self, name: str) -> TierEntry:
        return next(t for t in self.tiers if t.name == name)


class ConfigError(ValueError):
    pass


def load_config(args: dict[str, Any]) -> AppConfig:
    """Application args are either the config itself or `{"config_path": ...}` naming a
    YAML file of args, or a Serve config file (its first application's args are used)."""
    if "config_path" in args:
        path = Path(args["config_path"])
        if not path.is_absolute():
            path = Path(__file__).resolve().parent.parent / path
        args = yaml.safe_load(path.read_text())
        if "applications" in args:
            args = args["applications"][0].get("args") or {}
    try:
        return AppConfig.model_validate(args)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc or '(root)'}: {err['msg']}")
        raise ConfigError("invalid application config:\n" + "\n".join(lines)) from None


def state_dir(configured: str | None) -> Path:
    """Where the gateway and the store keep their files (`gateway.state_dir`)."""
    raw = configured or os.environ.get("KIMI_SERVE_STATE") or "~/.local/share/kimi-serve"
    return Path(raw).expanduser()

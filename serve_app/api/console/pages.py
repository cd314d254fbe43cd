"""The console's pages and forms, for key holders and operators.

A visitor signs in with an API key or the admin credential; the sign-in becomes a random
session token in an HttpOnly, SameSite=Strict cookie, held by the gateway (so every router
replica knows it) and never the credential itself. Every form carries a CSRF token derived
from the session (HMAC), checked before anything changes; the sign-in form carries one
tied to a pre-session cookie. Pages are rendered here, with a strict Content-Security-Policy
(no script at all, styles from our own stylesheet only). A key holder's pages take no key
id from the URL or the form: they show the signed-in key's data and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import ValidationError

from deployments.scheduling.loadboard import TierLoad
from serve_app.api.admin import AdminAPI, answered
from serve_app.api.common.routes import ApiFamily, get, post
from serve_app.api.console.charts import bar_chart, format_value
from serve_app.api.console.keys_table import keys_page, number
from serve_app.api.console.scaling_events import ScalingEvents
from serve_app.config import AppConfig
from serve_app.errors import APIError
from serve_app.gateway.protocol import (
    ANONYMOUS,
    OPERATOR,
    GatewayAdmin,
    KeyAccount,
    NewKey,
    SignIns,
    StorageFault,
    UsageRecounting,
)
from serve_app.pipeline.pipeline import Pipeline

SESSION_COOKIE = "kimi_console"
PRE_COOKIE = "kimi_console_pre"  # the sign-in form's CSRF pair, before any session
MAX_FORM_BYTES = 64 * 1024
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

Snapshot = Callable[[], Awaitable[dict[str, TierLoad]]]


def csrf_for(token: str) -> str:
    return hmac.new(token.encode(), b"kimi-console-csrf", hashlib.sha256).hexdigest()


def when(ts: float | datetime | None) -> str:
    if ts is None:
        return "-"
    moment = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


class Forbidden(Exception):
    """A signed-in visitor asked for what is not theirs (an operator page, a bad form)."""


class ConsoleAPI:
    def __init__(
        self,
        config: AppConfig,
        pipeline: Pipeline,
        gateway: GatewayAdmin,
        signins: SignIns,
        admin: AdminAPI,
        snapshot: Snapshot,
        scaling: ScalingEvents,
    ) -> None:
        self.config = config
        self.settings = config.console
        self.pipeline = pipeline
        self.gateway = gateway
        self.signins = signins
        self.admin = admin
        self.snapshot = snapshot
        self.scaling = scaling
        self.env = Environment(
            loader=PackageLoader("serve_app.api.console", "templates"),
            autoescape=select_autoescape(["html"]),
        )
        self.env.filters["money"] = lambda v: format_value(float(v or 0), "USD")
        self.env.filters["when"] = when
        self.env.filters["num"] = lambda v: "-" if v is None else f"{v:,}"
        self.stylesheet = (
            resources.files("serve_app.api.console").joinpath("static/console.css").read_bytes()
        )

    # ---- plumbing --------------------------------------------------------------------

    def _enabled(self) -> None:
        if not self.settings.enabled:
            raise APIError(404, "the console is not enabled on this deployment")

    def page(
        self, template: str, status: int = 200, cookies: dict[str, str] | None = None, **ctx: Any
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(**ctx)
        response = HTMLResponse(html, status, headers=SECURITY_HEADERS)
        for name, value in (cookies or {}).items():
            self._cookie(response, name, value)
        return response

    def _cookie(
        self, response: Response, name: str, value: str, max_age: int | None = None
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age if max_age is not None else int(self.settings.session_ttl_s),
            path="/console",
            httponly=True,
            samesite="strict",
            secure=False,  # set below where the request came over https
        )

    def _secure(self, request: Request, response: Response) -> Response:
        if request.url.scheme == "https":
            cookies = response.headers.getlist("set-cookie")
            del response.headers["set-cookie"]
            for c in cookies:
                response.headers.append("set-cookie", f"{c}; Secure")
        return response

    async def _form(self, request: Request) -> dict[str, str]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise Forbidden("the form is too large")
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[-1] for k, v in fields.items()}

    async def _subject(self, request: Request) -> tuple[str, str] | None:
        """(session token, subject) of a live sign-in, or None."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        subject = await self.signins.subject(token)
        return None if subject is None else (token, subject)

    async def _checked_form(self, request: Request) -> tuple[str, dict[str, str]]:
        """The subject and form of a state-changing post whose CSRF token is right."""
        signed = await self._subject(request)
        if signed is None:
            raise Forbidden("sign in first")
        token, subject = signed
        form = await self._form(request)
        if not hmac.compare_digest(form.get("csrf", ""), csrf_for(token)):
            raise Forbidden("the form's CSRF token is missing or wrong; reload the page")
        return subject, form

    def refused(self, why: str, status: int = 403) -> HTMLResponse:
        return self.page("message.html", status, title="Refused", message=why, back="/console")

    # ---- pages -----------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        self._enabled()
        signed = await self._subject(request)
        if signed is None:
            return self._sign_in_page(request)
        token, subject = signed
        if subject == OPERATOR:
            return await self._operator(request, token)
        return await self._key_holder(request, token, subject)

    def _sign_in_page(
        self, request: Request, error: str | None = None, status: int = 200
    ) -> Response:
        pre = secrets.token_urlsafe(24)
        response = self.page(
            "signin.html",
            status,
            cookies={PRE_COOKIE: pre},
            csrf=csrf_for(pre),
            error=error,
        )
        return self._secure(request, response)

    async def _key_holder(self, request: Request, token: str, key_id: str) -> Response:
        account = await answered(self.gateway.key_account(key_id))
        if account is None or account.info.revoked_at is not None:
            await self.signins.close(token)
            return self._sign_in_page(request, "This key has been revoked; sign in again.", 401)
        answer = await self.gateway.usage(key_id, ["day"])
        days = answer if isinstance(answer, list) else []
        base = str(request.base_url).rstrip("/")
        return self.page(
            "key_holder.html",
            signout=True,
            recounting=answer.pending if isinstance(answer, UsageRecounting) else None,
            csrf=csrf_for(token),
            account=account,
            budget=budget_view(account),
            spend_chart=bar_chart([(d["day"][5:], d["cost_usd"]) for d in days[-14:]], "USD"),
            token_chart=bar_chart(
                [(d["day"][5:], d["prompt_tokens"] + d["completion_tokens"]) for d in days[-14:]],
                "tokens",
            ),
            days=days,
            by_tier=await self._usage(key_id, ["tier"]),
            by_model=await self._usage(key_id, ["model"]),
            by_session=await self._usage(key_id, ["session"]),
            recent=await self.gateway.recent(key_id, self.settings.recent_requests),
            base_url=base,
        )

    async def _usage(self, key_id: str | None, by: list[str]) -> list[dict]:
        rows = await self.gateway.usage(key_id, by)
        return rows if isinstance(rows, list) else []

    async def _operator(self, request: Request, token: str, **extra: Any) -> Response:
        keys = await answered(self.gateway.list_keys())
        answer = await self.gateway.usage(None, ["key_id"])
        by_key = {r["key_id"]: r for r in answer} if isinstance(answer, list) else {}
        prices = {t.name: t.price for t in self.config.tiers}
        usage = await self._usage(None, ["day", "plan", "tier"])
        for row in usage:
            price = prices.get(row["tier"])
            row["list_cost"] = (
                price.cost(row["prompt_tokens"], row["completion_tokens"]) if price else None
            )
        return self.page(
            "operator.html",
            signout=True,
            recounting=answer.pending if isinstance(answer, UsageRecounting) else None,
            csrf=csrf_for(token),
            keys=keys_page(
                keys,
                request.query_params.get("q", ""),
                number(request.query_params.get("page")),
            ),
            by_key=by_key,
            plans=sorted(self.config.plans),
            usage=usage,
            tiers=await self._tiers(),
            dashboard=self._dashboard(request),
            now=time.time(),
            **extra,
        )

    async def tiers_page(self, request: Request) -> Response:
        """The operators' live tier figures, refreshed by the page itself every 5 s."""
        self._enabled()
        signed = await self._subject(request)
        if signed is None or signed[1] != OPERATOR:
            return self.refused("operators only: sign in with the admin credential")
        return self.page(
            "tiers.html",
            signout=True,
            csrf=csrf_for(signed[0]),
            tiers=await self._tiers(),
            dashboard=self._dashboard(request),
        )

    async def _tiers(self) -> dict[str, Any]:
        loads = await self.snapshot()
        window = self.pipeline.ttft
        p50, p90, counts = window.quantile_ms(0.5), window.quantile_ms(0.9), window.counts()
        return {
            "ttft_window": {"seconds": window.window_s, "needed": window.min_samples},
            "rows": [
                {
                    "name": t.name,
                    "engine": t.engine,
                    "load": loads.get(t.name),
                    "ttft_p50": p50.get(t.name),
                    "ttft_p90": p90.get(t.name),
                    "ttft_samples": counts.get(t.name, 0),
                    "autoscaling": t.autoscaling,
                }
                for t in self.config.tiers
            ],
            "events": self.scaling.latest(),
        }

    def _dashboard(self, request: Request) -> str:
        return self.settings.dashboard_url or f"http://{request.url.hostname}:8265"

    def stylesheet_response(self) -> Response:
        self._enabled()
        headers = {**SECURITY_HEADERS, "cache-control": "public, max-age=3600"}
        return Response(self.stylesheet, media_type="text/css", headers=headers)

    # ---- forms -----------------------------------------------------------------------

    async def sign_in(self, request: Request) -> Response:
        self._enabled()
        form = await self._form(request)
        pre = request.cookies.get(PRE_COOKIE, "")
        if not pre or not hmac.compare_digest(form.get("csrf", ""), csrf_for(pre)):
            return self.refused("the sign-in form's CSRF token is missing or wrong; reload it")
        credential = form.get("credential", "").strip()
        if not credential:
            return self._sign_in_page(request, "Enter an API key or the admin credential.", 400)
        subject, refusal = None, "That is not an API key."

        async def check() -> bool:
            nonlocal subject, refusal
            if self.admin.is_admin(credential):
                subject = OPERATOR
                return True
            try:
                caller = await self.pipeline.identify(credential)
            except APIError as exc:
                refusal = exc.message
                return False
            subject = None if caller.key_id == ANONYMOUS else caller.key_id
            return subject is not None

        try:
            if not await self.admin.doorman.attempt(request, "console", check):
                return self._sign_in_page(request, refusal, 401)
        except APIError as exc:  # the address waits (429), or the gateway is away
            response = self._sign_in_page(request, exc.message, exc.status)
            response.headers.update(exc.headers)
            return response
        assert subject is not None
        try:
            token = await self.signins.open(subject, self.settings.session_ttl_s)
        except StorageFault as exc:
            return self._sign_in_page(request, f"{exc}; try again shortly.", 503)
        response = RedirectResponse("/console", 303, headers=SECURITY_HEADERS)
        self._cookie(response, SESSION_COOKIE, token)
        self._cookie(response, PRE_COOKIE, "", max_age=0)
        return self._secure(request, response)

    async def sign_out(self, request: Request) -> Response:
        self._enabled()
        try:
            await self._checked_form(request)
        except Forbidden as exc:
            return self.refused(str(exc))
        await self.signins.close(request.cookies[SESSION_COOKIE])
        response = RedirectResponse("/console", 303, headers=SECURITY_HEADERS)
        self._cookie(response, SESSION_COOKIE, "", max_age=0)
        return response

    async def _operator_form(self, request: Request) -> tuple[str, dict[str, str]]:
        subject, form = await self._checked_form(request)
        if subject != OPERATOR:
            raise Forbidden("operators only: sign in with the admin credential")
        return request.cookies[SESSION_COOKIE], form

    async def create_key(self, request: Request) -> Response:
        self._enabled()
        try:
            token, form = await self._operator_form(request)
            spec = NewKey(
                plan=form.get("plan", ""),
                name=form.get("name", "")[:128],
                overrides=overrides_of(form),
                expires_at=expiry_of(form),
            )
            key, info = await answered(self.gateway.create_key(spec))
        except Forbidden as exc:
            return self.refused(str(exc))
        except (ValueError, ValidationError) as exc:
            return self.refused(f"the key was not created: {exc}", 400)
        # the secret is in this one answer (no-store) and nowhere else, ever
        return await self._operator(request, token, created={"key": key, "info": info})

    async def revoke_key(self, request: Request, key_id: str) -> Response:
        self._enabled()
        try:
            await self._operator_form(request)
        except Forbidden as exc:
            return self.refused(str(exc))
        await answered(self.gateway.revoke_key(key_id))
        return RedirectResponse("/console", 303, headers=SECURITY_HEADERS)

    async def update_key(self, request: Request, key_id: str) -> Response:
        self._enabled()
        try:
            _, form = await self._operator_form(request)
            updated = await answered(
                self.gateway.update_key(key_id, form.get("plan") or None, overrides_of(form))
            )
        except Forbidden as exc:
            return self.refused(str(exc))
        except (ValueError, ValidationError) as exc:
            return self.refused(f"the key was not changed: {exc}", 400)
        if updated is None:
            return self.refused(f"no active key {key_id!r}", 404)
        return RedirectResponse("/console", 303, headers=SECURITY_HEADERS)


OVERRIDE_FIELDS = {
    "requests_per_minute": int,
    "tokens_per_minute": int,
    "max_concurrent": int,
    "monthly_token_budget": int,
    "monthly_spend_usd": float,
    "max_output_tokens": int,
}


def overrides_of(form: dict[str, str]) -> dict[str, Any]:
    """The per-key limits a form sets (blank = the plan's)."""
    out: dict[str, Any] = {}
    for name, kind in OVERRIDE_FIELDS.items():
        raw = form.get(name, "").strip()
        if raw:
            try:
                out[name] = kind(raw)
            except ValueError:
                raise ValueError(f"{name} must be a number") from None
    return out


def expiry_of(form: dict[str, str]) -> float | None:
    raw = form.get("expires_in_days", "").strip()
    if not raw:
        return None
    try:
        days = float(raw)
    except ValueError:
        raise ValueError("expires_in_days must be a number") from None
    return time.time() + days * 86400


def budget_view(account: KeyAccount) -> dict[str, Any]:
    """This month's use against the key's monthly budgets (what is left, if capped)."""
    limits = account.limits
    tokens_cap = limits.monthly_token_budget if limits else None
    spend_cap = limits.monthly_spend_usd if limits else None
    return {
        "month": account.month,
        "tokens": account.tokens,
        "spend": account.spend,
        "tokens_cap": tokens_cap,
        "spend_cap": spend_cap,
        "tokens_left": None if tokens_cap is None else max(tokens_cap - account.tokens, 0),
        "spend_left": None if spend_cap is None else max(spend_cap - account.spend, 0.0),
    }


CONSOLE = ApiFamily(  # pages, not API: left out of the OpenAPI document
    ConsoleAPI,
    tuple(
        dataclasses.replace(route, in_schema=False)
        for route in (
            get("/console", ConsoleAPI.home),
            get("/console/tiers", ConsoleAPI.tiers_page),
            get("/console/static/console.css", lambda api, _: api.stylesheet_response()),
            post("/console/login", ConsoleAPI.sign_in),
            post("/console/logout", ConsoleAPI.sign_out),
            post("/console/keys", ConsoleAPI.create_key),
            post("/console/keys/{key_id}/revoke", ConsoleAPI.revoke_key),
            post("/console/keys/{key_id}", ConsoleAPI.update_key),
        )
    ),
)

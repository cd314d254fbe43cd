"""The API adapters on fakes: the real route tables, adapters, pipeline, store client and
actor class, over in-process engines and gateway (`tests/fakes/`), reached through the
official SDKs on an in-process HTTP transport. No Ray, no model: each test in well
under a second."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from serve_app.api.anthropic.routes import ANTHROPIC, AnthropicAPI
from serve_app.api.common.app import api_app
from serve_app.api.openai.routes import OPENAI, OpenAIAPI
from serve_app.api.responses.conversations import CONVERSATIONS, ConversationsAPI
from serve_app.api.responses.routes import RESPONSES, ResponsesAPI
from serve_app.pipeline.pipeline import Pipeline
from serve_app.pipeline.telemetry import IngressMetrics
from serve_app.reasoning.sealing import Sealer
from serve_app.store.client import StoreClient
from tests.fakes.engine import FakeEngine
from tests.fakes.gateway import CFG, KEY, FakeGateway, InMemoryReasoning
from tests.fakes.store import local_store
from tests.fakes.tiers import InProcessTiers


@dataclass
class Served:
    """One in-process app and what stands behind it."""

    engine: FakeEngine  # every tier's engine (one, so a test sees all it was asked)
    gateway: FakeGateway
    store: StoreClient
    responses: ResponsesAPI
    http: httpx2.AsyncClient  # the SDKs' own HTTP package
    oai: openai.AsyncOpenAI
    claude: anthropic.AsyncAnthropic


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    engine = FakeEngine(tokens=6)
    gateway = FakeGateway("enterprise")
    tiers = InProcessTiers(premium=engine, standard=engine, budget=engine)
    pipeline = Pipeline(CFG, tiers, gateway, "ingress-0", IngressMetrics())
    store = local_store(tmp_path)
    sealer = Sealer([os.urandom(32)])
    responses = ResponsesAPI(pipeline, CFG, sealer, store)
    adapters = {
        type(a): a
        for a in (
            OpenAIAPI(pipeline, CFG, InMemoryReasoning()),
            AnthropicAPI(pipeline, CFG, sealer),
            responses,
            ConversationsAPI(pipeline, store, CFG.router.max_body_bytes),
        )
    }
    app = api_app((OPENAI, ANTHROPIC, RESPONSES, CONVERSATIONS), lambda: adapters)
    transport = httpx2.ASGITransport(app=app)
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx2.AsyncClient(
        transport=transport, base_url="http://app", headers=headers
    ) as http:
        oai = openai.AsyncOpenAI(api_key=KEY, base_url="http://app/v1", http_client=http)
        claude = anthropic.AsyncAnthropic(api_key=KEY, base_url="http://app", http_client=http)
        yield Served(engine, gateway, store, responses, http, oai, claude)

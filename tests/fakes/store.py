"""The response store in-process: the real `StoreClient` over the real actor class (its
SQLite database in a temporary folder), without Ray or its background loops."""

from __future__ import annotations

from pathlib import Path

from serve_app.config import SessionSettings
from serve_app.store.actor import StoreActor
from serve_app.store.client import StoreClient
from tests.fakes.actors import LocalCalls


def local_store(root: Path, settings: SessionSettings | None = None) -> StoreClient:
    actor = StoreActor.__ray_actor_class__(str(root), settings or SessionSettings(), False)
    return StoreClient(LocalCalls(actor))  # type: ignore[arg-type]

"""The session store on a real SQLite file: isolation by owner, chains, quota, expiry."""

from __future__ import annotations

import time

import pytest

from serve_app.store.protocol import StoredResponse
from serve_app.store.responses_db import ItemIdTaken, QuotaExceeded, ResponsesDB, StoreLimits


def response(rid: str, text: str = "x", session: str | None = None) -> StoredResponse:
    doc = {"id": rid, "output": [{"type": "message", "id": f"m{rid}", "text": text}]}
    return StoredResponse(rid, session, doc, [{"type": "message", "id": f"i{rid}"}])


@pytest.fixture
def store(tmp_path):
    s = ResponsesDB(tmp_path / "sessions.db", StoreLimits(ttl_s=3600, quota_bytes=100_000))
    yield s
    s.close()


def test_a_chain_is_rebuilt_oldest_first_and_only_for_its_owner(store, tmp_path):
    store.put_response("alice", response("r1", session="s"), None)
    store.put_response("alice", response("r2"), "r1")
    store.put_response("alice", response("r3"), "r2")
    chain = store.chain("alice", "r3")
    assert [r.id for r in chain] == ["r1", "r2", "r3"]
    assert chain[0].session == "s"
    assert store.chain("bob", "r3") is None
    assert store.get_response("bob", "r1") is None
    assert not store.delete_response("bob", "r1")
    # another process opening the same file (a restarted actor) sees it all
    again = ResponsesDB(tmp_path / "sessions.db", store.limits)
    assert [r.id for r in again.chain("alice", "r2")] == ["r1", "r2"]
    assert store.delete_response("alice", "r2")
    assert [r.id for r in store.chain("alice", "r3")] == ["r3"]  # a broken chain starts later


def test_conversations_keep_items_in_order_per_owner(store):
    store.create_conversation("alice", "c1", {"topic": "t"}, [{"id": "a"}, {"id": "b"}])
    assert store.add_items("alice", "c1", [{"id": "c"}])
    assert not store.add_items("bob", "c1", [{"id": "d"}])
    assert [i["id"] for i in store.items("alice", "c1")] == ["a", "b", "c"]
    assert [i["id"] for i in store.items("alice", "c1", after="a", limit=1)] == ["b"]
    assert [i["id"] for i in store.items("alice", "c1", newest_first=True)] == ["c", "b", "a"]
    assert store.items("bob", "c1") is None
    assert store.delete_item("alice", "c1", "b")
    assert store.update_conversation("alice", "c1", {"topic": "u"})
    assert store.conversation("alice", "c1")[1] == {"topic": "u"}
    assert store.conversation("bob", "c1") is None
    assert store.delete_conversation("alice", "c1")
    assert store.items("alice", "c1") is None


def test_an_item_id_already_in_the_conversation_is_refused_and_nothing_added(store):
    store.create_conversation("alice", "c1", {}, [{"id": "a"}])
    with pytest.raises(ItemIdTaken):
        store.add_items("alice", "c1", [{"id": "b"}, {"id": "a"}])
    assert [i["id"] for i in store.items("alice", "c1")] == ["a"]  # rolled back, "b" too
    assert store.add_items("alice", "c1", [{"id": "b"}])


def test_the_quota_evicts_the_owners_oldest_responses_only(store):
    store.limits = StoreLimits(ttl_s=3600, quota_bytes=1_000)
    store.put_response("bob", response("b1", "y" * 300), None)
    for n in range(6):
        store.put_response("alice", response(f"r{n}", "z" * 300), None)
    assert store.used_bytes("alice") <= 1_000
    assert store.get_response("alice", "r0") is None and store.get_response("alice", "r5")
    assert store.get_response("bob", "b1") is not None
    with pytest.raises(QuotaExceeded):
        store.put_response("alice", response("big", "w" * 2_000), None)


def test_expired_rows_are_gone_to_readers_and_swept(store):
    store.limits = StoreLimits(ttl_s=60, quota_bytes=100_000)
    past = time.time() - 120
    store.put_response("alice", response("old"), None, now=past)
    store.create_conversation("alice", "c-old", {}, [{"id": "a"}], now=past)
    store.put_response("alice", response("new"), None)
    assert store.get_response("alice", "old") is None
    assert store.items("alice", "c-old") is None
    assert store.sweep() == 2
    assert store.get_response("alice", "new") is not None
    assert store.delete_owner("alice") == 1
    assert store.get_response("alice", "new") is None


def background(rid: str, status: str) -> StoredResponse:
    return StoredResponse(rid, None, {"id": rid, "status": status, "output": []}, [])


def test_a_background_run_is_cancelled_lost_or_finished_never_stuck(store):
    store.put_response("alice", background("b1", "queued"), None)
    assert store.touch("alice", "b1") == "queued"
    assert store.touch("bob", "b1") is None
    assert store.cancel_response("bob", "b1") is None
    assert store.cancel_response("alice", "b1").doc["status"] == "cancelled"
    assert store.touch("alice", "b1") == "cancelled"  # the run hears it and stops
    store.put_response("alice", background("b1", "completed"), None)  # its last write
    assert store.get_response("alice", "b1").doc["status"] == "cancelled"
    # a finished response is not cancelled after the fact
    store.put_response("alice", background("b2", "completed"), None)
    assert store.cancel_response("alice", "b2").doc["status"] == "completed"
    # a run whose replica died goes quiet: failed with the reason, not in_progress forever
    store.put_response("alice", background("b3", "in_progress"), None, now=time.time() - 120)
    lost = store.get_response("alice", "b3").doc
    assert lost["status"] == "failed" and "lost" in lost["error"]["message"]
    assert store.reap_lost_runs() == 0

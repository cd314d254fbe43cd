"""The console's keys table (api/console/keys_table.py): a thousand keys searched and paged
on the server, newest first."""

from __future__ import annotations

from serve_app.api.console.keys_table import PAGE_SIZE, keys_page, number
from serve_app.gateway.keys import KeyOverrides
from serve_app.gateway.protocol import KeyInfo


def keys(n: int) -> list[KeyInfo]:
    return [
        KeyInfo(
            key_id=f"{i:012x}",
            plan="free" if i % 10 else "enterprise",
            name=f"team-{i}",
            overrides=KeyOverrides(),
            metadata={},
            created_at=1_000_000.0 + i,
        )
        for i in range(n)
    ]


def test_a_thousand_keys_page_newest_first():
    first = keys_page(keys(1000))
    assert (first.page, first.pages, first.matched, first.total) == (1, 20, 1000, 1000)
    assert len(first.rows) == PAGE_SIZE and first.rows[0].name == "team-999"
    assert (first.first, first.last) == (1, 50)
    last = keys_page(keys(1000), page=99)  # past the end: the last page
    assert last.page == 20 and last.rows[-1].name == "team-0" and last.last == 1000


def test_search_matches_id_name_or_plan_in_any_case():
    found = keys_page(keys(1000), "TEAM-12")
    assert {k.name for k in found.rows} >= {"team-12", "team-120", "team-129"}
    assert all("team-12" in k.name for k in found.rows) and found.total == 1000
    assert keys_page(keys(1000), "enterprise").matched == 100
    assert keys_page(keys(1000), "no such thing").rows == []


def test_a_page_number_that_is_no_number_is_the_first():
    assert number(None) == 1 and number("x") == 1 and number("-3") == 1 and number("7") == 7

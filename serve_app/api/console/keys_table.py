"""The operator's keys table, searched and paged on the server: a deployment with
thousands of keys shows one page of them, newest first."""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.gateway.protocol import KeyInfo

PAGE_SIZE = 50


@dataclass(frozen=True)
class KeysPage:
    rows: list[KeyInfo]
    q: str
    page: int  # 1-based
    pages: int
    matched: int
    total: int

    @property
    def first(self) -> int:
        """The position of the page's first row among those matched (1-based; 0: none)."""
        return (self.page - 1) * PAGE_SIZE + 1 if self.rows else 0

    @property
    def last(self) -> int:
        return self.first + len(self.rows) - 1 if self.rows else 0


def number(text: str | None) -> int:
    """A page number from the query string (anything else: the first page)."""
    try:
        return max(1, int(text or 1))
    except ValueError:
        return 1


def keys_page(keys: list[KeyInfo], q: str = "", page: int = 1) -> KeysPage:
    """The keys whose id, name or plan contains `q` (any case), newest first, page
    `page` of them (past the last: the last)."""
    needle = q.strip().lower()
    matched = [
        k
        for k in sorted(keys, key=lambda k: k.created_at, reverse=True)
        if not needle or any(needle in field.lower() for field in (k.key_id, k.name, k.plan))
    ]
    pages = max(1, -(-len(matched) // PAGE_SIZE))
    page = min(max(page, 1), pages)
    rows = matched[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    return KeysPage(rows, q.strip(), page, pages, len(matched), len(keys))

"""One writer for a state dir (serve_app/state_claim.py): a gateway replaced while it was
cut off writes nothing when it wakes, and its callers are answered by the new one."""

from __future__ import annotations

from typing import NoReturn

import pytest

from serve_app.gateway.limits import Ask
from serve_app.gateway.usage_log import read_usage
from serve_app.state_claim import StateClaim
from tests.unit.gateway_in_process import CALLER, Gateway, plans, record


class Replaced(Exception):
    """Stands in for the process ending."""


def replaced() -> NoReturn:
    raise Replaced


def test_each_claim_outnumbers_the_last_and_the_older_one_lets_go(tmp_path):
    first = StateClaim(tmp_path, "gateway", replaced)
    assert first.held()
    first.check()  # held: goes on
    second = StateClaim(tmp_path, "gateway", replaced)
    assert second.number == first.number + 1
    assert second.held() and not first.held()
    with pytest.raises(Replaced):
        first.check()
    assert StateClaim(tmp_path, "store", replaced).held() and second.held()  # per name


def test_a_claim_file_rewritten_with_its_own_number_is_still_held(tmp_path):
    claim = StateClaim(tmp_path, "gateway", replaced)
    claim.path.unlink()
    claim.path.write_text(str(claim.number))  # a restore of the dir from a copy
    assert claim.held()


def test_an_unwritable_dir_still_serves_and_still_yields(tmp_path):
    (tmp_path / ".gateway.claim.tmp").mkdir()  # the temporary file cannot be written
    claim = StateClaim(tmp_path, "gateway", replaced)
    assert claim.held() and claim.number == 0
    (tmp_path / ".gateway.claim.tmp").rmdir()
    StateClaim(tmp_path, "gateway", replaced)
    assert not claim.held()


async def test_a_gateway_replaced_while_cut_off_meters_nothing_when_it_wakes(tmp_path):
    old = Gateway(str(tmp_path), plans(), 1000, 3600)
    old.claim.on_lost = replaced
    ticket = "t-1"
    assert (await old.admit(CALLER, Ask(tokens=20, cost=0.0), ticket)).ticket == ticket
    new = Gateway(str(tmp_path), plans(), 1000, 3600)  # Ray's restart, elsewhere
    with pytest.raises(Replaced):  # the settlement queued while the old one was frozen
        await old.settle(ticket, record(1))
    with pytest.raises(Replaced):
        await old._settle_lapsed()
    await new.settle(ticket, record(1))  # the router's retry, answered by the new one
    new.close()
    assert [r["request_id"] for r in read_usage(tmp_path / "usage").to_pylist()] == ["req-1"]

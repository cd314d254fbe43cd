"""The web console in a real headless browser (Debian's chromium, driven by Playwright)
against the real app: key holders see their own usage, operators manage keys and watch
tiers; cookies, CSRF and isolation hold. Screenshots go to docs/ (shown in docs/console.md)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_TOKEN, new_key

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs"
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.fail(
            "no chromium on this machine: `make test` installs Debian's package"
            " (scripts/install_browser.sh); it needs apt and root or sudo"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def signed_in(browser, serve_url: str, credential: str, width: int = 1440):
    context = browser.new_context(viewport={"width": width, "height": 1000})
    page = context.new_page()
    page.goto(f"{serve_url}/console")
    page.fill("#credential", credential)
    page.click("#sign-in")
    page.wait_for_load_state()
    return page


def api(serve_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=key, max_retries=0, timeout=120)


def flush(admin: httpx.Client) -> None:
    assert admin.post("/admin/usage/flush").status_code == 200


def test_a_key_holder_sees_their_requests_in_the_chart_and_table(browser, serve_url, admin):
    key, key_id = new_key(admin, "standard", monthly_spend_usd=5)
    client = api(serve_url, key)
    ids = []
    for tier, session in (("standard", "agent-7"), ("budget", "agent-7"), ("budget", None)):
        raw = client.chat.completions.with_raw_response.create(
            model=f"kimi-k2.5:{tier}",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            extra_headers={"x-session-id": session} if session else None,
        )
        ids.append(raw.headers["x-request-id"])
    flush(admin)

    page = signed_in(browser, serve_url, key)
    assert page.inner_text("#key-id") == key_id and page.inner_text("#plan") == "standard"
    bars = page.locator("#spend-chart g.bar")
    assert bars.count() >= 1
    assert float(bars.last.get_attribute("data-value")) > 0
    tokens = page.locator("#token-chart g.bar").last.get_attribute("data-value")
    assert float(tokens) >= 3 * 4
    shown = {r.get_attribute("data-request-id") for r in page.locator("#recent tr.request").all()}
    assert set(ids) <= shown
    assert "budget" in page.inner_text("#by-tier") and "standard" in page.inner_text("#by-tier")
    assert "agent-7" in page.inner_text("#by-session")
    assert "of $5.00" in page.inner_text("#budget")
    assert f"{serve_url}/v1" in page.inner_text("#quickstart")

    # the key was exchanged for a session: it is in no cookie and no storage of the page
    cookies = page.context.cookies()
    assert [c["name"] for c in cookies] == ["kimi_console"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
    assert key not in cookies[0]["value"] and key not in page.content()
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("window.localStorage.length + window.sessionStorage.length") == 0

    response = page.goto(f"{serve_url}/console")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script" not in csp
    page.screenshot(path=str(DOCS / "console-key-holder.png"), full_page=True)

    page.click("#sign-out")
    page.wait_for_load_state()
    assert page.locator("#credential").count() == 1
    # signed out: the session cookie is gone (the sign-in form sets its own CSRF cookie)
    assert "kimi_console" not in {c["name"] for c in page.context.cookies()}


def test_an_operator_creates_uses_and_revokes_a_key(browser, serve_url):
    page = signed_in(browser, serve_url, ADMIN_TOKEN)
    assert page.locator("#tiers tr.tier").count() == 3
    page.select_option("#new-plan", "premium")
    page.fill("#new-name", "console-made")
    page.click("#create")
    page.wait_for_load_state()
    secret = page.inner_text("#new-secret").strip()
    key_id = page.inner_text("#created h2").split(":")[1].split()[0]
    assert secret.startswith(f"sk-kimi-{key_id}-")

    r = api(serve_url, secret).chat.completions.create(
        model="kimi-k2.5:premium", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.usage.completion_tokens == 2

    page.goto(f"{serve_url}/console")  # the secret was shown once: never again
    assert secret not in page.content()
    row = page.locator(f"tr.key[data-key-id='{key_id}']")
    assert "premium" in row.inner_text() and "active" in row.inner_text()
    page.screenshot(path=str(DOCS / "console-operator.png"), full_page=True)

    # change its plan, then revoke it
    row.locator("select[name=plan]").select_option("standard")
    row.locator("button.change").click()
    page.wait_for_load_state()
    assert "standard" in page.locator(f"tr.key[data-key-id='{key_id}'] td").nth(2).inner_text()
    with pytest.raises(openai.PermissionDeniedError):  # premium is not in its plan now
        api(serve_url, secret).chat.completions.create(
            model="kimi-k2.5:premium", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    page.locator(f"tr.key[data-key-id='{key_id}'] button.revoke").click()
    page.wait_for_load_state()
    assert "revoked" in page.locator(f"tr.key[data-key-id='{key_id}']").inner_text()
    with pytest.raises(openai.AuthenticationError):
        api(serve_url, secret).chat.completions.create(
            model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )

    tiers = page.goto(f"{serve_url}/console/tiers")
    assert tiers.status == 200
    # TTFT figures say what they rest on: samples of the last 30 s, never a bare "-"
    for cell in page.locator("#tiers tr.tier td.ttft").all():
        assert "samples" in cell.inner_text(), cell.inner_text()
    assert page.locator("meta[http-equiv=refresh]").get_attribute("content") == "5"
    assert {t.get_attribute("data-tier") for t in page.locator("#tiers tr.tier").all()} == {
        "premium",
        "standard",
        "budget",
    }


def session_of(serve_url: str, credential: str) -> tuple[httpx.Client, str]:
    """A console sign-in without a browser: the client (holding the cookie) and a CSRF
    token of its pages."""
    http = httpx.Client(base_url=serve_url, timeout=60)
    form = http.get("/console").text
    pre = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    signed = http.post("/console/login", data={"csrf": pre, "credential": credential})
    assert signed.status_code == 303
    page = http.get("/console").text
    return http, re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_posts_without_the_csrf_token_change_nothing(serve_url, admin):
    operator, csrf = session_of(serve_url, ADMIN_TOKEN)
    before = len(admin.get("/admin/keys").json()["data"])
    assert operator.post("/console/keys", data={"plan": "free", "name": "x"}).status_code == 403
    forged = operator.post("/console/keys", data={"plan": "free", "csrf": "0" * 64})
    assert forged.status_code == 403
    assert len(admin.get("/admin/keys").json()["data"]) == before
    made = operator.post("/console/keys", data={"plan": "free", "name": "ok", "csrf": csrf})
    assert made.status_code == 200 and len(admin.get("/admin/keys").json()["data"]) == before + 1

    # the sign-in form has its own token, tied to a cookie the forger does not have
    stranger = httpx.post(
        f"{serve_url}/console/login", data={"credential": ADMIN_TOKEN, "csrf": csrf}
    )
    assert stranger.status_code == 403 and "kimi_console=" not in stranger.headers.get(
        "set-cookie", ""
    )
    # signing out needs the token too; with it, the session ends for good
    old = operator.cookies["kimi_console"]
    assert operator.post("/console/logout").status_code == 403
    assert operator.post("/console/logout", data={"csrf": csrf}).status_code == 303
    replay = httpx.get(f"{serve_url}/console", cookies={"kimi_console": old})
    assert 'id="credential"' in replay.text


def test_a_key_holder_cannot_reach_another_keys_data(serve_url, admin):
    key_a, id_a = new_key(admin, "enterprise")
    key_b, id_b = new_key(admin, "enterprise")
    theirs = api(serve_url, key_b).chat.completions.with_raw_response.create(
        model="kimi-k2.5:budget", messages=[{"role": "user", "content": "secret"}], max_tokens=2
    )
    their_request = theirs.headers["x-request-id"]
    flush(admin)
    holder, csrf = session_of(serve_url, key_a)
    for path in (
        f"/console?key_id={id_b}",
        f"/console?key={key_b}",
        f"/console/keys/{id_b}",
        "/console/tiers",
    ):
        page = holder.get(path)
        assert their_request not in page.text and id_b not in page.text.replace(path, "")
    assert holder.get("/console/tiers").status_code == 403
    # operator forms refuse a key holder even with a valid CSRF token of their own
    for path in (f"/console/keys/{id_b}/revoke", f"/console/keys/{id_b}", "/console/keys"):
        refused = holder.post(path, data={"csrf": csrf, "plan": "free"})
        assert refused.status_code == 403 and "operators only" in refused.text
    assert admin.get("/admin/keys").json()["data"]
    key_b_row = next(k for k in admin.get("/admin/keys").json()["data"] if k["key_id"] == id_b)
    assert key_b_row["revoked_at"] is None and key_b_row["plan"] == "enterprise"
    # a forged session cookie is no session
    forged = httpx.get(f"{serve_url}/console", cookies={"kimi_console": "x" * 43})
    assert 'id="credential"' in forged.text and id_a not in forged.text


def test_the_revoked_keys_console_session_ends_with_it(serve_url, admin):
    key, key_id = new_key(admin, "free")
    holder, _ = session_of(serve_url, key)
    assert key_id in holder.get("/console").text
    assert admin.delete(f"/admin/keys/{key_id}").status_code == 200
    page = holder.get("/console")
    assert 'id="credential"' in page.text and key_id not in page.text


def test_sign_ins_outlive_a_gateway_restart_and_still_end_with_their_key(serve_url, admin):
    import ray

    from serve_app.actors import NAMESPACE
    from serve_app.gateway.actor import ACTOR_NAME

    key, key_id = new_key(admin, "free")
    holder, _ = session_of(serve_url, key)
    operator, _ = session_of(serve_url, ADMIN_TOKEN)
    gateway = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    pid = ray.get(gateway.__ray_call__.remote(lambda self: os.getpid()))
    ray.kill(gateway, no_restart=False)  # Ray starts the actor again, on the same state dir
    # the same sign-ins, now read by the new process
    assert key_id in holder.get("/console").text
    assert 'id="credential"' not in operator.get("/console").text
    assert ray.get(gateway.__ray_call__.remote(lambda self: os.getpid())) != pid
    assert admin.delete(f"/admin/keys/{key_id}").status_code == 200
    page = holder.get("/console")
    assert 'id="credential"' in page.text and key_id not in page.text


CLIPPED = """() => {
  // controls cut off: outside the page's width where nothing scrolls, or outside the
  // scrollable area of the box that scrolls them (a wide table scrolls inside its card)
  const out = [];
  if (document.documentElement.scrollWidth > window.innerWidth + 1) out.push("the page");
  for (const el of document.querySelectorAll("button, input:not([type=hidden]), select, a")) {
    const r = el.getBoundingClientRect();
    if (!r.width) continue;
    let box = el.parentElement;
    while (box && getComputedStyle(box).overflowX === "visible") box = box.parentElement;
    const b = box ? box.getBoundingClientRect() : {left: 0};
    const right = box ? b.left + box.scrollWidth - box.scrollLeft : window.innerWidth;
    if (r.left < b.left - 1 || r.right > right + 1) out.push(el.outerHTML.slice(0, 80));
  }
  return out;
}"""


@pytest.mark.parametrize("width", [1280, 800])
def test_a_thousand_keys_page_and_search_with_nothing_clipped(browser, serve_url, admin, width):
    listed = admin.get("/admin/keys").json()["data"]
    for i in range(len(listed), 1000):
        made = admin.post("/admin/keys", json={"plan": "free", "name": f"bulk-{i}"})
        assert made.status_code == 201
    total = len(admin.get("/admin/keys").json()["data"])
    page = signed_in(browser, serve_url, ADMIN_TOKEN, width)
    assert page.locator("#keys tr.key").count() == 50
    assert f"keys 1\u201350 of {total}" in page.inner_text("#keys-paging")
    assert page.evaluate(CLIPPED) == []
    page.click("#keys-next")
    page.wait_for_load_state()
    assert f"keys 51\u2013100 of {total}" in page.inner_text("#keys-paging")
    page.fill("#key-q", "bulk-77")
    page.click("#key-search button")
    page.wait_for_load_state()
    names = [row.locator("td").nth(1).inner_text() for row in page.locator("#keys tr.key").all()]
    assert names and all("bulk-77" in n for n in names) and "bulk-777" in names
    assert page.evaluate(CLIPPED) == []
    tiers = page.goto(f"{serve_url}/console/tiers")
    assert tiers.status == 200 and page.evaluate(CLIPPED) == []

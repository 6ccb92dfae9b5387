"""The pages as a person uses them: real headless Chromium (Debian's) driven by Playwright.

Chromium is found on ``PATH`` (``chromium``) or at ``/usr/bin/chromium``;
``.ci/run`` installs Debian's package when it is missing. Without it (or
without the playwright package) these tests skip with the reason, except
in CI (``CI`` set), where they fail: a browser test that cannot run there
is a broken CI, not a pass.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from agentpolicy import PaymentRequest, PolicyEngine
from agentpolicy.serve.service import ServeOptions
from agentpolicy.testing import ManualClock
from tests.receiver import Receiver
from tests.serve_helpers import LINK_SECRET, Served, mcp

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
MEMO = '<img src=x onerror="alert(1)"><script>alert(2)</script> invoice 42'
POLICY = {
    "limits": {"daily": {"value": "1000000000"}, "monthly": {"value": "20000000000"}},
    "approvalConfig": {"thresholds": [{"amount": {"value": "100000000"}, "requiredApprovers": 1,
                                       "approvers": ["alice"]}]},
}  # fmt: skip
PHONE = {"width": 390, "height": 844}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(reason)


def chromium_path() -> str | None:
    """Debian's Chromium: on PATH, or where the package puts it."""
    found = shutil.which("chromium")
    if found is None and os.path.exists("/usr/bin/chromium"):
        found = "/usr/bin/chromium"
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for the module; each test opens fresh contexts (no shared cookies).

    Playwright's ``launch`` gives Chromium a fresh temporary profile (its
    user-data dir), removed when the browser closes.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    path = chromium_path()
    if path is None:
        _unavailable("Chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, headless=True, args=FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A page in a fresh browser context that records dialogs and CSP or script errors."""

    def __init__(self, browser: Any, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def world() -> Iterator[tuple[PolicyEngine, Receiver]]:
    receiver = Receiver().start()
    engine = PolicyEngine(
        clock=ManualClock(), link_secret=LINK_SECRET,
        webhook_endpoints=[{"url": receiver.url, "secret": "s" * 32}],
    )  # fmt: skip
    engine.set_policy("bot", POLICY)
    try:
        yield engine, receiver
    finally:
        engine.close()
        receiver.stop()


def _authorize(served: Served, agent: str, amount: str, memo: str | None = None) -> Any:
    async def pay(client: Any) -> Any:
        args = {"amount": amount, "recipient": "0xvendor", "network": "eip155:8453",
                "category": "data", "memo": memo}  # fmt: skip
        result = await client.call_tool("agent_policy_authorize",
                                        {k: v for k, v in args.items() if v is not None})  # fmt: skip
        return result.structured_content["data"]

    return mcp(served.url, agent, pay)


def test_an_approver_opens_the_webhook_link_approves_and_the_agent_confirms(
    browser: Any, world: tuple[PolicyEngine, Receiver]
) -> None:
    engine, receiver = world
    with Served(engine) as served:
        agent = served.token("agent", agent_id="bot")
        decision = _authorize(served, agent, "450250000", MEMO)
        assert decision["code"] == "APPROVAL_REQUIRED"
        approval_id = decision["approvalId"]
        assert engine.flush_webhooks(10)
        (created,) = [json.loads(r.body) for r in receiver.received
                      if json.loads(r.body)["event"] == "approval.created"]  # fmt: skip
        (alice,) = [x for x in created["links"] if x["approver"] == "alice"]
        link = f"{served.url}/approvals/{approval_id}?t={alice['approve']}"

        person = Page(browser)
        try:
            page = person.page
            page.goto(link)
            assert (
                page.get_by_role("heading", level=1).inner_text() == "bot asks to pay 450.25 USDT"
            )
            assert page.locator(".memo").inner_text() == MEMO  # shown as text, never run
            assert "0xvendor" in page.get_by_role("heading", level=2).inner_text()
            assert "policy version 1: payments of 100 USDT or more need 1 of alice" in \
                page.locator(".rules").inner_text()  # fmt: skip
            daily = page.get_by_role("img", name="daily: spent 0 USDT, reserved 450.25 USDT, "
                                     "remaining 549.75 USDT of 1000 USDT")  # fmt: skip
            assert daily.count() == 1
            page.get_by_role("button", name="Approve 450.25 USDT").click()
            page.wait_for_url(f"{served.url}/approvals/vote")
            assert page.get_by_role("heading", level=1).inner_text() == "You approved this payment"
            assert (
                "It is approved: the agent may pay now." in page.get_by_role("status").inner_text()
            )

            async def settle(client: Any) -> Any:
                got = await client.call_tool("agent_policy_approvals_get",
                                             {"approvalId": approval_id})  # fmt: skip
                reservation = got.structured_content["data"]["reservationId"]
                done = await client.call_tool("agent_policy_confirm",
                                              {"reservationId": reservation})  # fmt: skip
                return done.structured_content

            confirmed = mcp(served.url, agent, settle)
            assert confirmed["success"]
            assert confirmed["data"]["status"] == "confirmed"
            assert engine.budget("bot").periods["daily"].spent.value == 450_250_000

            page.goto(link)  # the link again: shown, but it votes no more
            assert page.get_by_role("button", name="Approve 450.25 USDT").count() == 0
            assert "This approval is approved." in page.locator(".state").inner_text()
            assert person.dialogs == []
            assert person.errors == []
        finally:
            person.close()
        vote = engine.get_approval(approval_id).votes[0]
        assert (vote.approver, vote.decision, vote.via) == ("alice", "approve", "link")


def test_a_link_cannot_be_replayed_by_a_post_without_its_form(
    browser: Any, world: tuple[PolicyEngine, Receiver]
) -> None:
    engine, _ = world
    with Served(engine) as served:
        d = engine.authorize(PaymentRequest("bot", "200000000", "0xv", "eip155:8453"))
        token = next(x.token for x in engine.approval_links(d.approval_id)
                     if x.decision == "approve")  # fmt: skip
        person = Page(browser)
        try:
            page = person.page
            page.goto(f"{served.url}/approvals/{d.approval_id}?t={token}")  # GET changes nothing
            assert engine.get_approval(d.approval_id).status.value == "pending"
            answer = page.request.post(f"{served.url}/approvals/vote", form={
                "approval": d.approval_id, "t": token, "decision": "approve", "csrf": "forged"})  # fmt: skip
            assert answer.status == 403
            assert engine.get_approval(d.approval_id).status.value == "pending"
        finally:
            person.close()


def test_sign_in_and_approve_with_the_keyboard_only(
    browser: Any, world: tuple[PolicyEngine, Receiver]
) -> None:
    engine, _ = world
    with Served(engine) as served:
        d = engine.authorize(PaymentRequest("bot", "300000000", "0xvendor", "eip155:8453"))
        token = served.token("approver", approver="alice")
        person = Page(browser)
        try:
            page = person.page
            page.goto(served.url + "/approvals")
            assert page.url == served.url + "/signin?next=/approvals"

            def tab_to(check: str, limit: int = 40) -> None:
                for _ in range(limit):
                    page.keyboard.press("Tab")
                    if page.evaluate(check):
                        return
                raise AssertionError(f"Tab never reached {check}")

            tab_to("document.activeElement.id === 'token'")
            page.keyboard.type(token)
            page.keyboard.press("Enter")
            page.wait_for_url(served.url + "/approvals")
            assert page.get_by_role("heading", level=1).inner_text() == "Pending approvals"
            tab_to("document.activeElement.textContent.trim() === 'Approve 300 USDT'")
            outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
            assert outline == "solid"  # the focus is visible
            page.keyboard.press("Enter")
            page.wait_for_url(f"{served.url}/approvals/vote")
            assert page.get_by_role("heading", level=1).inner_text() == "You approved this payment"
            assert engine.get_approval(d.approval_id).status.value == "approved"
            vote = engine.get_approval(d.approval_id).votes[0]
            assert (vote.approver, vote.via) == ("alice", None)  # a session's vote is unsigned
            page.get_by_role("button", name="Sign out").click()
            page.wait_for_url(served.url + "/signin")
            page.goto(served.url + "/approvals")
            assert page.url.startswith(served.url + "/signin")  # the session is gone
            assert person.dialogs == []
            assert person.errors == []
        finally:
            person.close()


def test_on_a_phone_the_list_updates_by_itself(
    browser: Any, world: tuple[PolicyEngine, Receiver]
) -> None:
    engine, _ = world
    with Served(engine, ServeOptions(refresh_seconds=1, sweep_seconds=3600.0)) as served:
        token = served.token("approver", approver="alice")
        person = Page(browser, viewport=PHONE, is_mobile=True, has_touch=True)
        try:
            page = person.page
            page.goto(served.url + "/signin")
            page.get_by_label("Access token").fill(token)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(served.url + "/approvals")
            assert "Nothing is waiting for you" in page.locator("#pending").inner_text()
            engine.authorize(PaymentRequest("bot", "150000000", "0xnew", "eip155:8453",
                                            memo=MEMO))  # fmt: skip
            approve = page.get_by_role("button", name="Approve 150 USDT")
            approve.wait_for()  # it arrives by itself, without a reload
            assert page.get_by_role("status").first.inner_text().startswith("1 pending approval")
            box = approve.bounding_box()
            assert box is not None
            assert box["height"] >= 44
            assert box["width"] <= PHONE["width"]
            wide = page.evaluate("document.documentElement.scrollWidth")
            assert wide <= PHONE["width"]  # nothing runs off the side of the screen
            assert page.locator(".memo").inner_text() == MEMO
            assert person.dialogs == []
            assert person.errors == []
        finally:
            person.close()


def test_an_admin_reads_a_budget_page(browser: Any, world: tuple[PolicyEngine, Receiver]) -> None:
    engine, _ = world
    engine.set_policy("bot", {**POLICY, "limits": {"daily": {"value": "2000000000"}}})
    d = engine.authorize(PaymentRequest("bot", "50000000", "0xvendor", "eip155:8453"))
    engine.confirm(d.reservation_id)  # type: ignore[arg-type]
    with Served(engine) as served:
        token = served.token("admin")
        person = Page(browser)
        try:
            page = person.page
            page.goto(served.url + "/signin?next=/agents")
            page.get_by_label("Access token").fill(token)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(served.url + "/agents")
            page.get_by_role("link", name="bot").click()
            page.wait_for_url(served.url + "/agents/bot")
            assert page.get_by_role("heading", level=1).inner_text() == "Budget of bot"
            bar = page.get_by_role("img", name="daily: spent 50 USDT, reserved 0 USDT, remaining "
                                   "1950 USDT of 2000 USDT")  # fmt: skip
            assert bar.count() == 1
            table = page.get_by_role("region", name="Recent decisions").inner_text()
            assert "ALLOWED" in table
            assert "confirm" in table
            versions = page.locator(".versions").inner_text()
            assert "version 2 (live): set" in versions
            assert "limits.daily.value: 1000000000 -> 2000000000" in versions
            assert person.errors == []
        finally:
            person.close()

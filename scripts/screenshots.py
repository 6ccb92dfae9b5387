"""Write the screenshots of docs/serve.md (docs/img/serve-*.png) from a real service and Chromium.

Run from the repository (after ``pip install -e '.[dev]'``, with Debian's
``chromium``)::

    .venv/bin/python scripts/screenshots.py

The data is made here, on a clock standing at 2026-01-19 10:00 UTC, so the
pictures change only when the pages do.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright

from agentpolicy import PaymentRequest, PolicyEngine
from agentpolicy.testing import ManualClock
from tests.serve_helpers import LINK_SECRET, Served
from tests.test_serve_browser import FLAGS, PHONE, chromium_path

OUT = ROOT / "docs" / "img"
U = 1_000_000


def _data(engine: PolicyEngine, clock: ManualClock) -> tuple[str, str]:
    engine.set_policy("acme-fleet", {"limits": {"daily": {"value": str(5000 * U)},
                                                "monthly": {"value": str(60000 * U)}}})  # fmt: skip
    for daily in (1000, 1500):  # two versions: the page shows what changed
        engine.set_policy("acme:research", {
            "parent": "acme-fleet",
            "limits": {"daily": {"value": str(daily * U)}, "monthly": {"value": str(20000 * U)},
                       "counts": [{"window": "daily", "max": 50}]},
            "approvalConfig": {"thresholds": [{"amount": {"value": str(100 * U)},
                                               "requiredApprovers": 1,
                                               "approvers": ["alice@acme.com", "bob@acme.com"]}]},
        })  # fmt: skip
        clock.advance(minutes=5)
    for amount, who in ((42, "0x4a1c...data-vendor"), (18, "0x77e0...search-api")):
        d = engine.authorize(PaymentRequest("acme:research", amount * U, who, "eip155:8453",
                                            category="data", memo="daily market data"))  # fmt: skip
        engine.confirm(d.reservation_id)  # type: ignore[arg-type]
        clock.advance(minutes=7)
    big = engine.authorize(PaymentRequest(
        "acme:research", 450_250_000, "0x9f2b...c0ffee", "eip155:8453", category="reports",
        memo="Q1 industry report (invoice 2026-0142)",
    ))  # fmt: skip
    clock.advance(minutes=3)
    other = engine.authorize(PaymentRequest(
        "acme:research", 120 * U, "0x51d0...gpu-rental", "eip155:8453", category="compute",
        memo="4 GPU hours for the benchmark run",
    ))  # fmt: skip
    clock.advance(minutes=2)
    assert big.approval_id is not None
    assert other.approval_id is not None
    return big.approval_id, other.approval_id


def main() -> None:
    path = chromium_path()
    if path is None:
        raise SystemExit("screenshots need Debian's chromium (apt-get install chromium)")
    OUT.mkdir(parents=True, exist_ok=True)
    clock = ManualClock()
    engine = PolicyEngine(clock=clock, link_secret=LINK_SECRET)
    try:
        first, _ = _data(engine, clock)
        link = next(x.token for x in engine.approval_links(first)
                    if x.approver == "alice@acme.com" and x.decision == "approve")  # fmt: skip
        with Served(engine) as served, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=path, headless=True, args=FLAGS)
            alice = served.token("approver", approver="alice@acme.com")
            admin = served.token("admin", label="operations")

            def shoot(name: str, url: str, token: str | None, **context: Any) -> Any:
                ctx = browser.new_context(**context)
                page = ctx.new_page()
                if token is not None:
                    page.goto(served.url + "/signin")
                    page.get_by_label("Access token").fill(token)
                    page.get_by_role("button", name="Sign in").click()
                    page.wait_for_url(lambda url: "/signin" not in url)
                page.goto(url)
                page.screenshot(path=str(OUT / name), full_page=True)
                print(f"wrote docs/img/{name}")
                return ctx, page

            ctx, _ = shoot("serve-approvals.png", served.url + "/approvals", alice,
                           viewport={"width": 1000, "height": 900})  # fmt: skip
            ctx.close()
            ctx, page = shoot("serve-link-phone.png", f"{served.url}/approvals/{first}?t={link}",
                              None, viewport=PHONE, is_mobile=True, device_scale_factor=1)  # fmt: skip
            page.get_by_label("Comment (optional)").fill("ok, budgeted for Q1")
            page.get_by_role("button", name="Approve 450.25 USDT").click()
            page.wait_for_url("**/vote")
            page.screenshot(path=str(OUT / "serve-approved-phone.png"), full_page=True)
            print("wrote docs/img/serve-approved-phone.png")
            ctx.close()
            ctx, _ = shoot("serve-agent.png", served.url + "/agents/acme%3Aresearch", admin,
                           viewport={"width": 1000, "height": 900})  # fmt: skip
            ctx.close()
            ctx, _ = shoot("serve-signin.png", served.url + "/signin", None,
                           viewport={"width": 700, "height": 420})  # fmt: skip
            ctx.close()
            browser.close()
    finally:
        engine.close()


if __name__ == "__main__":
    main()

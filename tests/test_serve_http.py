"""agentpolicy serve over real HTTP: MCP with the official client, tokens, pages, health, metrics."""

from __future__ import annotations

import contextlib
import html
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client

from agentpolicy import PaymentRequest, PolicyEngine
from agentpolicy.serve.app import CSP
from agentpolicy.serve.service import ServeOptions
from agentpolicy.storage import SQLiteStorage
from agentpolicy.testing import ManualClock
from tests.faulty import FaultyStorage
from tests.serve_helpers import LINK_SECRET, Served, mcp

PAY = {"amount": "5000000", "recipient": "0xv", "network": "eip155:8453"}
POLICY = {"limits": {"daily": {"value": "1000000000"}},
          "approvalConfig": {"thresholds": [{"amount": {"value": "100000000"},
                                             "requiredApprovers": 1, "approvers": ["alice"]}]}}  # fmt: skip


@pytest.fixture
def served() -> Iterator[Served]:
    engine = PolicyEngine(clock=ManualClock(), link_secret=LINK_SECRET)
    engine.set_policy("bot", POLICY)
    engine.set_policy("other", POLICY)
    engine.set_policy("acme:bot", POLICY)
    try:
        with Served(engine) as s:
            yield s
    finally:
        engine.close()


def test_the_official_client_lists_the_roles_tools_and_authorizes(served: Served) -> None:
    agent = served.token("agent", agent_id="bot")
    admin = served.token("admin")
    org_admin = served.token("admin", org_id="acme")

    async def names(client: Client) -> list[str]:
        return [t.name for t in (await client.list_tools()).tools]

    assert len(mcp(served.url, agent, names)) == 10
    assert len(mcp(served.url, admin, names)) == 25
    org_tools = mcp(served.url, org_admin, names)
    assert len(org_tools) == 21
    assert "agent_policy_approvers_register" not in org_tools
    assert "agent_policy_approvers_list" not in org_tools  # the registry is every org's

    async def pay(client: Client) -> Any:
        bound = next(t for t in (await client.list_tools()).tools if t.name ==
                     "agent_policy_authorize")  # fmt: skip
        assert "agentId" not in bound.input_schema["required"]  # bound: it defaults to bot
        return (await client.call_tool("agent_policy_authorize", PAY)).structured_content

    for mode in ("auto", "legacy"):  # the 2026 per-request era and the initialize handshake
        result = mcp(served.url, agent, pay, mode=mode)
        assert result["success"]
        assert result["data"]["allowed"] is True
    assert served.engine.budget("bot").periods["daily"].reserved.value == 10_000_000


def test_a_token_outside_its_binding_gets_forbidden_and_nothing_changes(served: Served) -> None:
    agent = served.token("agent", agent_id="bot")
    org_admin = served.token("admin", org_id="acme")
    before = served.engine.history("other")

    async def calls(client: Client) -> list[Any]:
        out = []
        for name, args in (
            ("agent_policy_authorize", {**PAY, "agentId": "other"}),
            ("agent_policy_budget", {"agentId": "other"}),
            ("agent_policy_set", {"agentId": "bot", "policy": {}}),
        ):
            result = await client.call_tool(name, args)
            out.append((result.is_error, result.structured_content["error"]["code"]))  # type: ignore[index]
        return out

    assert mcp(served.url, agent, calls) == [(True, "FORBIDDEN")] * 3

    async def registry(client: Client) -> Any:
        r = await client.call_tool("agent_policy_approvers_register",
                                   {"name": "mallory", "publicKey": "ed25519:0C-hD8UlIHxFv_YmrAoeQGbiWS0W6vRloP32XqLaZfk"})  # fmt: skip
        s = await client.call_tool("agent_policy_set", {"agentId": "other", "policy": {}})
        return r.structured_content, s.structured_content

    registered, other = mcp(served.url, org_admin, registry)
    assert registered["error"]["code"] == other["error"]["code"] == "FORBIDDEN"
    assert served.engine.history("other") == before
    assert served.engine.list_approvers() == []
    assert served.engine.get_policy("other").version == 1  # type: ignore[union-attr]


def test_no_token_a_wrong_revoked_or_expired_token_is_401_and_changes_nothing(
    served: Served,
) -> None:
    good, secret = served.tokens.create("agent", agent_id="bot")
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "agent_policy_authorize", "arguments": PAY}}  # fmt: skip
    headers = {"Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2025-06-18"}  # fmt: skip
    revoked, revoked_secret = served.tokens.create("agent", agent_id="bot")
    served.tokens.revoke(revoked.id)
    clock = served.engine.clock
    assert isinstance(clock, ManualClock)
    expiring = served.tokens.create("agent", agent_id="bot",
                                    expires_at=clock() + timedelta(minutes=1))[1]  # fmt: skip
    clock.advance(minutes=1)
    answers = []
    for auth in (None, "Basic dXNlcjpwYXNz", "Bearer nothing", f"Bearer {secret[:-2]}xx",
                 f"Bearer {revoked_secret}", f"Bearer {expiring}"):  # fmt: skip
        sent = dict(headers) if auth is None else {**headers, "Authorization": auth}
        r = httpx2.post(served.url + "/mcp", json=body, headers=sent)
        answers.append((r.status_code, r.headers.get("www-authenticate", "").split(",")[0]))
    assert answers == [(401, 'Bearer realm="agentpolicy"')] * 6
    assert served.engine.history("bot")[0].event == "policy_set"  # no decision was made
    approver = served.token("approver", approver="alice")
    r = httpx2.post(served.url + "/mcp", json=body,
                    headers={**headers, "Authorization": f"Bearer {approver}"})  # fmt: skip
    assert r.status_code == 403
    r = httpx2.post(served.url + "/mcp", json=body, headers={**headers,
                    "Authorization": f"Bearer {secret}"})  # fmt: skip
    assert r.status_code == 200
    assert r.json()["result"]["structuredContent"]["success"]
    assert good.id in secret


def test_budget_pages_with_bearer_tokens_and_the_xss_memo_is_escaped(served: Served) -> None:
    memo = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    served.engine.authorize(PaymentRequest("bot", "200000000", "0x<b>v</b>", "eip155:8453",
                                           memo=memo))  # fmt: skip
    agent = served.token("agent", agent_id="bot")
    admin = served.token("admin")

    def get(path: str, token: str | None, accept: str = "text/html") -> httpx2.Response:
        headers = {"Accept": accept}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx2.get(served.url + path, headers=headers, follow_redirects=False)

    own = get("/agents/bot", agent)
    assert own.status_code == 200
    assert "Budget of" in own.text
    assert own.headers["content-security-policy"] == CSP
    assert own.headers["x-frame-options"] == "DENY"
    assert own.headers["cache-control"] == "no-store"
    assert get("/agents/other", agent).status_code == 403
    assert get("/agents/bot", "apt_0000000000000000_" + "A" * 43).status_code == 401
    assert get("/agents/nobody", admin).status_code == 404
    page = get("/approvals", admin)
    assert page.status_code == 200
    assert "<script>alert" not in page.text
    assert "onerror=alert" not in page.text.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text
    assert "0x&lt;b&gt;v&lt;/b&gt;" in page.text
    assert get("/approvals", agent).status_code == 403  # an agent token does not see approvals
    assert get("/approvals", None).status_code == 303  # a browser: to the sign-in page
    assert get("/approvals", None).headers["location"] == "/signin?next=/approvals"
    assert get("/approvals", None, accept="application/json").status_code == 401


def test_healthz_metrics_and_the_loopback_host_check(served: Served) -> None:
    admin = served.token("admin")
    agent = served.token("agent", agent_id="bot")
    watcher = served.token("metrics")
    assert httpx2.get(served.url + "/healthz").json() == {"status": "ok"}

    async def pay(client: Client) -> None:
        await client.call_tool("agent_policy_authorize", PAY)
        await client.call_tool("agent_policy_authorize", {**PAY, "amount": "200000000"})
        await client.call_tool("agent_policy_authorize", {**PAY, "amount": "900000000"})

    mcp(served.url, agent, pay)
    r = httpx2.get(served.url + "/metrics", headers={"Authorization": f"Bearer {watcher}"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = set(r.text.splitlines())
    assert {'agentpolicy_decisions_total{code="ALLOWED"} 1',
            'agentpolicy_decisions_total{code="APPROVAL_REQUIRED"} 1',
            'agentpolicy_decisions_total{code="DAILY_LIMIT"} 1',
            'agentpolicy_authorize_seconds_bucket{le="+Inf"} 3',
            "agentpolicy_authorize_seconds_count 3", "agentpolicy_open_reservations 2",
            "agentpolicy_pending_approvals 1", "agentpolicy_webhook_backlog 0",
            "agentpolicy_store_up 1"} <= lines  # fmt: skip
    assert httpx2.get(served.url + "/metrics").status_code == 401
    assert httpx2.get(served.url + "/metrics",
                      headers={"Authorization": f"Bearer {agent}"}).status_code == 403  # fmt: skip
    assert httpx2.get(served.url + "/metrics",
                      headers={"Authorization": f"Bearer {admin}"}).status_code == 200  # fmt: skip
    rebound = httpx2.get(served.url + "/healthz", headers={"Host": "evil.example:8402"})
    assert rebound.status_code == 421  # DNS rebinding: a loopback bind answers loopback names only


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_healthz_polled_on_a_sqlite_store_holds_no_descriptor_per_poll(tmp_path: Path) -> None:
    """Each check ran on a new thread, whose SQLite connection stayed open: 10,000 polls took
    the service to its descriptor limit, for good, without a token."""
    engine = PolicyEngine(storage=SQLiteStorage(tmp_path / "s.db"), clock=ManualClock())
    try:
        with Served(engine, ServeOptions(sweep_seconds=3600.0)) as s, httpx2.Client() as client:
            assert client.get(s.url + "/healthz").status_code == 200
            before = len(os.listdir("/proc/self/fd"))
            for _ in range(150):
                assert client.get(s.url + "/healthz").status_code == 200
            assert len(os.listdir("/proc/self/fd")) - before <= 8  # was 300 and more
    finally:
        engine.close()


def test_healthz_is_503_when_the_store_is_down() -> None:
    storage = FaultyStorage()
    engine = PolicyEngine(storage=storage, clock=ManualClock())  # type: ignore[arg-type]
    try:
        with Served(engine, ServeOptions(sweep_seconds=3600.0)) as s:
            assert httpx2.get(s.url + "/healthz").status_code == 200
            storage.down = True
            down = httpx2.get(s.url + "/healthz")
            assert down.status_code == 503
            assert down.json()["status"] == "unavailable"
            storage.down = False
    finally:
        engine.close()


def test_healthz_polled_while_the_store_hangs_leaves_one_thread_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # each /healthz left an anyio worker blocked on a hung store when its 2 s ran out: a load
    # balancer polling it grew the process by a thread per poll (100 polls: 100 threads)
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from agentpolicy.serve import health

    monkeypatch.setattr(health, "WAIT_SECONDS", 0.3)
    storage = FaultyStorage()
    engine = PolicyEngine(storage=storage, clock=ManualClock())  # type: ignore[arg-type]

    def checks() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "agentpolicy-healthz"]

    try:
        with Served(engine, ServeOptions(sweep_seconds=3600.0)) as s:
            assert httpx2.get(s.url + "/healthz").status_code == 200
            storage.stall()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _: httpx2.get(s.url + "/healthz", timeout=30),
                                        range(40)))  # fmt: skip
            assert [a.status_code for a in answers] == [503] * 40
            assert {a.json()["store"] for a in answers} == {"no answer within 0.3 s"}
            assert storage.stalled.is_set()
            assert len(checks()) == 1  # the one check in flight, shared by every poll
            storage.resume()
            for thread in checks():
                thread.join(10)
            assert checks() == []
            assert httpx2.get(s.url + "/healthz").json() == {"status": "ok"}
    finally:
        storage.resume()
        engine.close()


def test_healthz_starts_a_fresh_check_once_a_stuck_one_is_stale_and_bounds_the_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a ping stuck on a dead connection was joined by every later poll: /healthz stayed 503
    # after the store came back, for as long as the stuck ping lasted
    import threading

    import anyio

    from agentpolicy.serve import health

    monkeypatch.setattr(health, "FRESH_SECONDS", 0.0)  # every check under way is stale at once
    release = threading.Event()
    pings = []

    def ping() -> None:
        pings.append(1)
        if len(pings) == 1:
            release.wait(30)  # the first read is stuck; the store answers the later ones

    check = health.StoreCheck(ping)

    async def polls() -> list[Exception | None]:
        return [await check.check(0.2), await check.check(0.2)]

    first, second = anyio.run(polls)
    assert isinstance(first, TimeoutError)
    assert second is None  # a fresh check, answered
    release.set()

    always_stuck = threading.Event()
    stuck = health.StoreCheck(lambda: always_stuck.wait(30))

    async def many() -> list[Exception | None]:
        return [await stuck.check(0.01) for _ in range(12)]

    before = threading.active_count()
    assert all(isinstance(e, TimeoutError) for e in anyio.run(many))
    assert threading.active_count() - before <= health.MAX_STUCK + 1  # never one per poll
    always_stuck.set()


def test_a_store_failure_while_a_token_is_checked_names_nothing_to_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # before any login, the store's own words (a file's path, a host) went to whoever sent a
    # token or a cookie, or asked for the sign-in form; they go to the log, as /healthz's do
    storage = FaultyStorage()
    engine = PolicyEngine(storage=storage, clock=ManualClock())  # type: ignore[arg-type]
    stranger = "apt_0123456789abcdef_" + "A" * 43  # well formed: looked up in the store
    try:
        with Served(engine, ServeOptions(sweep_seconds=3600.0)) as s:
            storage.down = True
            with caplog.at_level("WARNING", logger="agentpolicy.serve"):
                answers = [
                    httpx2.get(s.url + "/approvals", headers={
                        "Authorization": f"Bearer {stranger}", "Accept": "application/json"}),
                    httpx2.get(s.url + "/approvals", headers={"Accept": "text/html"},
                               cookies={"agentpolicy_session": "x" * 40}),
                    httpx2.get(s.url + "/signin", headers={"Accept": "text/html"}),
                    httpx2.post(s.url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                headers={"Authorization": f"Bearer {stranger}",
                                         "Accept": "application/json, text/event-stream"}),
                ]  # fmt: skip
            storage.down = False
    finally:
        engine.close()
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert "down (test)" not in answer.text
        assert "the reason is in the service" in html.unescape(answer.text)
    assert "the store is down (test)" in caplog.text


def test_a_request_that_does_not_arrive_whole_in_time_loses_its_connection(
    monkeypatch: pytest.MonkeyPatch, served: Served
) -> None:
    # a connection that sent part of a request (its head, or a head and part of its body) was
    # kept open for ever: 1,100 of them took every file descriptor and no one else got in
    import socket
    import time

    from agentpolicy.serve import protocol

    monkeypatch.setattr(protocol, "REQUEST_SECONDS", 0.5)

    def closed_by_the_server(first: bytes, trickle: bytes) -> bool:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(first)
            sock.settimeout(0.1)
            began = time.monotonic()
            while time.monotonic() - began < 10:
                try:
                    if sock.recv(4096) == b"":
                        return True  # the server closed it
                except TimeoutError:
                    pass
                except ConnectionResetError:
                    return True  # closed with trickled bytes unread: the kernel resets it
                try:
                    sock.sendall(trickle)  # a byte now and then: it does not reset the deadline
                except OSError:
                    return True
            return False

    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    assert closed_by_the_server(head, b"X")
    body = (b"POST /signin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30000\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\ntoken")  # fmt: skip
    assert closed_by_the_server(body, b"a")
    # a whole request is answered, and the same connection serves the next one in its time
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/healthz").json() == {"status": "ok"}


def test_a_client_that_never_reads_its_answers_loses_its_connection(
    monkeypatch: pytest.MonkeyPatch, served: Served
) -> None:
    """Pipelined requests whose answers are never read held the connection (and the task
    writing it) for ever; a connection closed with answers unsent kept its descriptor."""
    import socket
    import time

    from agentpolicy.serve import protocol

    monkeypatch.setattr(protocol, "WRITE_SECONDS", 0.5)
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        # more answers than the kernel's buffers on both sides hold (about 4 MB here)
        sock.sendall(b"GET /static/style.css HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 1500)
        time.sleep(2)  # reading nothing, in real time: the server looks every 0.5 s here
        sock.settimeout(10)
        received, began = 0, time.monotonic()
        try:
            while time.monotonic() - began < 10:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            pass  # aborted: the kernel may say so at once
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
    one = len(httpx2.get(served.url + "/static/style.css").content)
    assert received < 1500 * one  # dropped with answers unsent, not served to the end
    assert time.monotonic() - began < 10  # ended by the server, not by this test's timeout


def test_a_client_that_reads_its_answers_slowly_keeps_its_connection(
    monkeypatch: pytest.MonkeyPatch, served: Served
) -> None:
    """asyncio's buffer moves only once the kernel's queue (megabytes) is half empty: watched
    alone, it stood still for longer than the watch while a slow reader read."""
    import socket
    import time

    from agentpolicy.serve import protocol

    monkeypatch.setattr(protocol, "WRITE_SECONDS", 0.5)
    one = len(httpx2.get(served.url + "/static/style.css").content)
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(b"GET /static/style.css HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 1500)
        received = 0
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                received += len(chunk)
                time.sleep(0.03)  # about 2 MB a second, read steadily
                if received > 1500 * one:
                    sock.settimeout(1)  # the last answers' headers, then nothing more
    assert received > 1500 * one  # every answer, bodies and headers


def test_a_connection_taken_over_by_an_upgrade_leaves_no_watch_behind(
    monkeypatch: pytest.MonkeyPatch, served: Served
) -> None:
    """Each WebSocket upgrade left its HTTP protocol watching writes, rescheduled for ever."""
    import gc
    import socket
    import time

    from agentpolicy.serve import protocol

    monkeypatch.setattr(protocol, "WRITE_SECONDS", 0.05)
    monkeypatch.setattr(protocol, "REQUEST_SECONDS", 0.05)
    upgrade = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sock.sendall(upgrade)
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
    began = time.monotonic()
    while time.monotonic() - began < 5:
        gc.collect()
        left = [o for o in gc.get_objects() if isinstance(o, protocol.DeadlineProtocol)]
        if not left:
            break
        time.sleep(0.1)
    assert left == []


def _form_value(page: str, name: str, after: str = "") -> str:
    match = re.search(rf'name="{name}" value="([^"]+)"', page[page.find(after) :])
    assert match is not None, f"no {name} in the page"
    return html.unescape(match.group(1))


def _signed_in(served: Served, token: str) -> httpx2.Client:
    client = httpx2.Client(base_url=served.url, headers={"Accept": "text/html"})
    form = client.get("/signin")
    answer = client.post("/signin", data={"token": token, "csrf": _form_value(form.text, "csrf"),
                                          "next": "/approvals"})  # fmt: skip
    assert answer.status_code == 303
    return client


def test_a_link_casts_its_own_decision_once_and_only_from_its_own_site(served: Served) -> None:
    d = served.engine.authorize(PaymentRequest("bot", "200000000", "0xv", "eip155:8453"))
    links = {x.decision: x.token for x in served.engine.approval_links(d.approval_id)}  # type: ignore[arg-type]
    vote = f"{served.url}/approvals/vote"
    # a deny link (the kind passed around as a "stop this" button) offers and casts deny only
    page = httpx2.get(f"{served.url}/approvals/{d.approval_id}?t={links['deny']}")
    assert 'value="deny"' in page.text
    assert 'value="approve"' not in page.text
    form = {"approval": d.approval_id, "t": links["deny"], "csrf": _form_value(page.text, "csrf"),
            "decision": "approve"}  # fmt: skip
    forged = httpx2.post(vote, data=form, headers={"Origin": served.url})
    assert forged.status_code == 403
    assert "may only deny" in forged.text
    approval = served.engine.get_approval(d.approval_id)  # type: ignore[arg-type]
    assert (approval.status.value, approval.votes) == ("pending", ())
    # the approve link offers approve only; its form is refused from another site
    page = httpx2.get(f"{served.url}/approvals/{d.approval_id}?t={links['approve']}")
    assert 'value="approve"' in page.text
    assert 'value="deny"' not in page.text
    form = {"approval": d.approval_id, "t": links["deny"], "decision": "deny",
            "comment": "not this quarter"}  # fmt: skip
    page = httpx2.get(f"{served.url}/approvals/{d.approval_id}?t={links['deny']}")
    form["csrf"] = _form_value(page.text, "csrf")
    elsewhere = httpx2.post(vote, data=form, headers={"Origin": "https://evil.example"})
    assert elsewhere.status_code == 403
    assert served.engine.get_approval(d.approval_id).status.value == "pending"  # type: ignore[arg-type]
    denied = httpx2.post(vote, data=form, headers={"Origin": served.url})
    assert denied.status_code == 200
    assert "You denied this payment" in denied.text
    approval = served.engine.get_approval(d.approval_id)  # type: ignore[arg-type]
    assert approval.status.value == "denied"
    assert [(v.approver, v.decision, v.via, v.comment) for v in approval.votes] == [
        ("alice", "deny", "link", "not this quarter")]  # fmt: skip
    again = httpx2.post(vote, data=form)
    assert again.status_code == 409  # the link voted once; nothing changes
    assert served.engine.get_approval(d.approval_id).status.value == "denied"  # type: ignore[arg-type]


def test_a_registered_approver_gets_no_buttons_and_the_command_instead(served: Served) -> None:
    from agentpolicy.signing import SigningKey

    served.engine.register_approver("alice", SigningKey.generate().public_key)
    d = served.engine.authorize(PaymentRequest("bot", "200000000", "0xv", "eip155:8453"))
    browser = _signed_in(served, served.token("approver", approver="alice"))
    try:
        page = browser.get("/approvals")
        assert page.status_code == 200
        assert f"agentpolicy approvals approve {d.approval_id} --as alice" in page.text
        assert 'value="approve"' not in page.text
        signout = _form_value(page.text, "csrf")  # the header's sign-out form
        unsigned = browser.post("/approvals/vote", data={
            "approval": d.approval_id, "decision": "approve", "csrf": signout})  # fmt: skip
        assert unsigned.status_code == 403  # APPROVER_NOT_AUTHORIZED: nothing changes
        assert served.engine.get_approval(d.approval_id).status.value == "pending"  # type: ignore[arg-type]
    finally:
        browser.close()


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_the_pages_run_natively_on_an_async_client_of_a_server_store(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    from agentpolicy.storage import open_async_storage
    from tests.backends import serve

    backends = serve(kind, tmp_path, request)
    backend = next(backends)
    request.addfinalizer(lambda: next(backends, None))  # closes and drops what it made
    assert backend.spec is not None
    engine = PolicyEngine(storage=backend.handle(), clock=ManualClock(), link_secret=LINK_SECRET)
    engine.set_policy("bot", POLICY)
    engine.authorize(PaymentRequest("bot", "200000000", "0xv", "eip155:8453"))
    native = open_async_storage(backend.spec[0], key_prefix=backend.spec[1])
    try:
        with Served(engine, async_storage=native) as s:
            assert s.app.state.service.aengine.native
            page = httpx2.get(s.url + "/approvals",
                              headers={"Authorization": f"Bearer {s.token('admin')}"})  # fmt: skip
            assert page.status_code == 200
            assert "200 USDT to" in page.text
            metrics = httpx2.get(s.url + "/metrics",
                                 headers={"Authorization": f"Bearer {s.token('metrics')}"})  # fmt: skip
            assert "agentpolicy_open_reservations 1" in metrics.text.splitlines()
    finally:
        engine.close()


def test_a_vote_form_votes_only_on_the_approval_it_shows_whatever_the_agent_id(
    served: Served,
) -> None:
    served.engine.set_policy("bot/../sub", POLICY)  # an id with a slash and a dot segment
    small = served.engine.authorize(PaymentRequest("bot/../sub", "100000000", "0xv", "eip155:8453"))
    big = served.engine.authorize(PaymentRequest("bot", "900000000", "0xv", "eip155:8453"))
    browser = _signed_in(served, served.token("approver", approver="alice"))
    try:
        page = browser.get("/approvals")  # (its own URL would lose its dot segment in a client)
        assert page.status_code == 200
        assert 'action="/approvals/vote"' in page.text  # no id in the path for a browser to resolve
        mine = f'name="approval" value="{html.escape(small.approval_id or "")}"'
        assert mine in page.text
        csrf = _form_value(page.text, "csrf", after=mine)
        other = browser.post("/approvals/vote", data={
            "approval": big.approval_id, "csrf": csrf, "decision": "approve"})  # fmt: skip
        assert other.status_code == 403  # a form made for one approval cannot vote on another
        assert served.engine.get_approval(big.approval_id or "").status.value == "pending"
        own = browser.post("/approvals/vote", data={
            "approval": small.approval_id, "csrf": csrf, "decision": "approve"})  # fmt: skip
        assert own.status_code == 200
        assert served.engine.get_approval(small.approval_id or "").status.value == "approved"
    finally:
        browser.close()


def test_a_link_page_is_reached_by_its_token_alone_and_sends_no_referrer_path(
    served: Served,
) -> None:
    served.engine.set_policy("research/browse", POLICY)
    d = served.engine.authorize(
        PaymentRequest("research/browse", "200000000", "0xv", "eip155:8453")
    )
    token = next(x.token for x in served.engine.approval_links(d.approval_id or "")
                 if x.decision == "approve")  # fmt: skip
    page = httpx2.get(f"{served.url}/approvals/link", params={"t": token})
    assert page.status_code == 200
    assert page.headers.get_list("referrer-policy") == ["origin"]
    assert '<meta name="referrer" content="origin">' in page.text  # a meta would override it
    assert f'value="{html.escape(d.approval_id or "")}"' in page.text
    metrics = served.token("metrics")
    for i in range(5):
        httpx2.get(f"{served.url}/x{i}")
    lines = httpx2.get(served.url + "/metrics",
                       headers={"Authorization": f"Bearer {metrics}"}).text  # fmt: skip
    assert 'route="/x0"' not in lines  # a fixed set of labels
    assert 'route="other"' in lines
    org_admin = served.token("admin", org_id="acme")
    bound = httpx2.get(served.url + "/metrics", headers={"Authorization": f"Bearer {org_admin}"})
    assert bound.status_code == 403  # the figures are the whole store's

"""``agentpolicy serve`` as a JSON API client sees it: every error is structured JSON.

A client that asks for JSON (``Accept: application/json``), and every caller
of ``/healthz`` and ``/metrics``, gets ``{"error": {"code", "message"}}``
(``"path"`` too when the engine named the bad input) for every kind of
error: never Starlette's plain-text default, an HTML page or a traceback.
``/mcp`` answers JSON-RPC errors. Browsers keep the error pages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from agentpolicy import PaymentRequest, PolicyEngine
from agentpolicy.errors import StorageUnavailableError
from agentpolicy.serve.app import create_app
from agentpolicy.serve.service import ServeOptions
from agentpolicy.serve.tokens import TokenStore
from agentpolicy.serve.web import Pages
from agentpolicy.testing import ManualClock

LINK_SECRET = "a test link secret of at least 32 characters!"
JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
MCP = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}
POLICY = {"limits": {"daily": {"value": "1000000000"}},
          "approvalConfig": {"thresholds": [{"amount": {"value": "100000000"},
                                             "requiredApprovers": 1, "approvers": ["alice"]}]}}  # fmt: skip


class Env:
    def __init__(self, app: Starlette, engine: PolicyEngine) -> None:
        self.app = app
        self.engine = engine
        self.tokens = TokenStore(engine.storage, engine.clock)

    def token(self, role: str, **binding: Any) -> str:
        return self.tokens.create(role, **binding)[1]

    def client(self) -> TestClient:
        return TestClient(self.app, base_url="http://127.0.0.1", follow_redirects=False,
                          raise_server_exceptions=False)  # fmt: skip

    def bearer(self, token: str, accept: dict[str, str] = JSON) -> dict[str, str]:
        return {**accept, "Authorization": f"Bearer {token}"}


def _make() -> Env:
    engine = PolicyEngine(clock=ManualClock(), link_secret=LINK_SECRET)
    engine.set_policy("bot", POLICY)
    return Env(create_app(engine, ServeOptions(sweep_seconds=3600.0)), engine)


@pytest.fixture
def env() -> Iterator[Env]:
    e = _make()
    try:
        yield e
    finally:
        e.engine.close()


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    """The structured error of ``r``, checked: its status, its code, JSON, no traceback."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    assert "Traceback" not in r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert set(error) <= {"code", "message", "path"}
    return dict(error)


def _rpc_error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = r.json()
    assert body["jsonrpc"] == "2.0"
    assert body["id"] is None
    assert isinstance(body["error"]["code"], int)
    assert body["error"]["message"]
    return dict(body["error"])


def test_an_unknown_route_is_a_structured_404(env: Env) -> None:
    c = env.client()
    error = _error(c.get("/no/such/route", headers=JSON), 404, "NOT_FOUND")
    assert "nothing at this address" in error["message"]
    _error(c.get("/static/nothing.js", headers=JSON), 404, "NOT_FOUND")
    page = c.get("/no/such/route", headers=HTML)  # a browser gets the service's error page
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "Not found" in page.text


def test_a_method_the_route_does_not_take_is_a_structured_405(env: Env) -> None:
    c = env.client()
    r = c.get("/signout", headers=JSON)
    error = _error(r, 405, "METHOD_NOT_ALLOWED")
    assert r.headers["allow"] == "POST"
    assert "POST" in error["message"]
    r = c.post("/healthz")  # an API route: JSON whatever the caller accepts
    _error(r, 405, "METHOD_NOT_ALLOWED")
    assert "GET" in r.headers["allow"]


def test_a_body_that_is_not_a_form_is_a_structured_400(env: Env) -> None:
    c = env.client()
    headers = {**env.bearer(env.token("approver", approver="alice")),
               "Content-Type": "application/json"}  # fmt: skip
    error = _error(c.post("/approvals/vote", headers=headers, content=b'{"approval": '), 400,
                   "INVALID_INPUT")  # fmt: skip
    assert "names no approval" in error["message"]
    many = "&".join(f"f{i}=x" for i in range(40))  # more fields than any form of ours
    r = c.post("/approvals/vote", content=many,
               headers={**JSON, "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    _error(r, 400, "INVALID_INPUT")


def test_a_multipart_body_is_a_structured_415(env: Env) -> None:
    r = env.client().post("/approvals/vote", content=b"--x\r\n\r\n--x--\r\n",
                          headers={**JSON, "Content-Type": "multipart/form-data; boundary=x"})  # fmt: skip
    error = _error(r, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert "multipart/form-data" in error["message"]
    assert r.headers["connection"] == "close"


def test_an_oversized_body_is_a_structured_413(env: Env) -> None:
    c = env.client()
    form = {**JSON, "Content-Type": "application/x-www-form-urlencoded"}
    error = _error(c.post("/approvals/vote", content=b"a" * 40_000, headers=form), 413,
                   "PAYLOAD_TOO_LARGE")  # fmt: skip
    assert "32 KiB" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off once past the bound
        for _ in range(10):
            yield b"a" * 8192

    _error(c.post("/signin", content=chunks(), headers=form), 413, "PAYLOAD_TOO_LARGE")


def test_a_bad_query_parameter_is_a_structured_error(env: Env) -> None:
    c = env.client()
    error = _error(c.get("/approvals/link", headers=JSON), 400, "INVALID_INPUT")
    assert "no token" in error["message"]
    _error(c.get("/approvals/link", params={"t": "apl1.garbage"}, headers=JSON), 403,
           "FORBIDDEN")  # fmt: skip


def test_a_bad_path_id_is_a_structured_error(env: Env) -> None:
    c = env.client()
    admin = env.bearer(env.token("admin"))
    error = _error(c.get("/agents/bot%20", headers=admin), 400, "INVALID_INPUT")
    assert error["path"] == "$.agentId"
    _error(c.get("/agents/nobody", headers=admin), 404, "NO_POLICY")
    _error(c.get("/approvals/apr_nope", headers=admin), 404, "APPROVAL_NOT_FOUND")
    _error(c.get("/approvals/..%2F..%2Fetc", headers=admin), 404, "APPROVAL_NOT_FOUND")


def test_an_exception_in_a_handler_is_a_structured_500_logged_and_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Pages, request: Any) -> Any:
        raise RuntimeError("internal detail 0xdeadbeef")

    monkeypatch.setattr(Pages, "agents", broken)
    e = _make()
    try:
        c = e.client()
        admin = e.token("admin")
        with caplog.at_level(logging.ERROR, logger="agentpolicy.serve"):
            r = c.get("/agents", headers=e.bearer(admin))
        error = _error(r, 500, "INTERNAL")
        assert "0xdeadbeef" not in r.text
        assert "RuntimeError" not in r.text
        assert "in its log" in error["message"]
        logged = [x for x in caplog.records if x.name == "agentpolicy.serve" and x.exc_info]
        assert logged
        assert "GET /agents" in logged[0].getMessage()
        page = c.get("/agents", headers=e.bearer(admin, HTML))  # a browser: the error page
        assert page.status_code == 500
        assert page.headers["content-type"].startswith("text/html")
        assert "0xdeadbeef" not in page.text
        assert "Traceback" not in page.text
        assert page.headers["x-content-type-options"] == "nosniff"  # still through the guard
    finally:
        e.engine.close()


def test_an_exception_on_an_api_route_is_a_structured_500(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("internal detail 0xdeadbeef")

    monkeypatch.setattr(env.app.state.service.tokens, "ping", broken)
    r = env.client().get("/healthz", headers=HTML)  # /healthz: JSON whatever it accepts
    _error(r, 500, "INTERNAL")
    assert "0xdeadbeef" not in r.text


def test_auth_failures_are_structured(env: Env) -> None:
    c = env.client()
    r = c.get("/approvals", headers=JSON)  # no token: no redirect to a sign-in page
    error = _error(r, 401, "UNAUTHORIZED")
    assert r.headers["www-authenticate"] == 'Bearer realm="agentpolicy"'
    assert "Sign in" in error["message"]
    wrong = "apt_0000000000000000_" + "A" * 43
    r = c.get("/agents", headers=env.bearer(wrong))
    _error(r, 401, "UNAUTHORIZED")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert wrong not in r.text
    _error(c.get("/approvals", headers=env.bearer(env.token("agent", agent_id="bot"))), 403,
           "FORBIDDEN")  # fmt: skip
    form = c.get("/signin")  # a sign-in refused, to a JSON client
    csrf = form.text.split('name="csrf" value="')[1].split('"')[0]
    r = c.post("/signin", data={"token": wrong, "csrf": csrf}, headers=JSON)
    _error(r, 401, "UNAUTHORIZED")
    _error(c.post("/signin", data={"token": wrong, "csrf": "forged"}, headers=JSON), 403,
           "FORBIDDEN")  # fmt: skip


def test_metrics_refusals_are_structured_whatever_the_caller_accepts(env: Env) -> None:
    c = env.client()
    scraper = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5,*/*;q=0.1"}
    r = c.get("/metrics", headers=scraper)
    _error(r, 401, "UNAUTHORIZED")
    assert r.headers["www-authenticate"] == 'Bearer realm="agentpolicy"'
    _error(c.get("/metrics", headers=env.bearer(env.token("agent", agent_id="bot"), scraper)),
           403, "FORBIDDEN")  # fmt: skip
    _error(c.get("/metrics", headers=env.bearer(env.token("admin", org_id="acme"), scraper)),
           403, "FORBIDDEN")  # fmt: skip


def test_a_host_that_is_not_loopback_is_a_structured_421(env: Env) -> None:
    r = env.client().get("/healthz", headers={**JSON, "Host": "rebound.example"})
    _error(r, 421, "MISDIRECTED_REQUEST")
    assert r.headers["x-content-type-options"] == "nosniff"


def test_a_store_that_fails_is_a_structured_503(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StorageUnavailableError("the store is down (test)")

    monkeypatch.setattr(env.app.state.service.aengine, "list_policies", down)
    r = env.client().get("/agents", headers=env.bearer(env.token("admin")))
    error = _error(r, 503, "STORAGE_UNAVAILABLE")
    assert "the store is down (test)" in error["message"]


def test_a_refused_vote_is_structured(env: Env) -> None:
    d = env.engine.authorize(PaymentRequest("bot", "200000000", "0xv", "eip155:8453"))
    assert d.approval_id is not None
    link = next(x.token for x in env.engine.approval_links(d.approval_id)
                if x.decision == "deny")  # fmt: skip
    c = env.client()
    page = c.get("/approvals/link", params={"t": link})
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    form = {"approval": d.approval_id, "decision": "approve", "t": link, "csrf": csrf}
    r = c.post("/approvals/vote", data=form, headers=JSON)  # a deny link never approves
    error = _error(r, 403, "APPROVER_NOT_AUTHORIZED")
    assert "nothing was changed" in error["message"]
    assert env.engine.get_approval(d.approval_id).status.value == "pending"


def test_mcp_transport_refusals_are_json_rpc_errors(env: Env) -> None:
    admin = env.token("admin")
    with env.client() as c:  # the lifespan runs the MCP transport
        headers = {**MCP, "Authorization": f"Bearer {admin}"}
        r = c.post("/mcp", content=b"{}", headers={**headers, "Content-Type": "text/plain"})
        assert "application/json" in _rpc_error(r, 400)["message"]
        r = c.post("/mcp", content=b"{not json", headers={**headers,
                                                           "Content-Type": "application/json"})  # fmt: skip
        _rpc_error(r, 400)
        big = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "' + \
            b"a" * (4 * 1024 * 1024) + b'"}}'  # fmt: skip
        r = c.post("/mcp", content=big, headers={**headers, "Content-Type": "application/json"})
        assert "4 MiB" in _rpc_error(r, 413)["message"]
        _rpc_error(c.get("/mcp", headers=headers), 405)
        _rpc_error(
            c.post("/mcp", content=b"{}", headers={**MCP, "Content-Type": "application/json"}), 401
        )

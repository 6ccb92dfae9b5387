"""What ``agentpolicy serve`` reads of a request, and what a vote says when the store fails.

Bodies: no path but ``/mcp`` reads more than a small bound of a body, or
any multipart body, before its route (and its caller check) runs; over
real HTTP, a declared or streamed 10 MB body and a multipart file part
are answered at once, with nothing read, parsed or spooled to disk.
Votes: a store that fails is a 503, and a store whose answer was lost
says the outcome is unknown, never "Nothing was changed". Logs: a link
token never reaches the access log, however its query name is spelled.
Links: a link whose approver registered a key since offers no buttons.
"""

from __future__ import annotations

import html
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import starlette.formparsers
import starlette.requests
from starlette.requests import Request
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.utils import get_path_with_query_string

from agentpolicy import PaymentRequest, PolicyEngine, StorageUnavailableError
from agentpolicy.serve.app import CSP, create_app
from agentpolicy.serve.command import _RedactLinks, redact_links
from agentpolicy.serve.limits import FORM_BODY_LIMIT
from agentpolicy.serve.service import ServeOptions
from agentpolicy.serve.tokens import TokenStore
from agentpolicy.signing import SigningKey
from agentpolicy.storage.base import Session
from agentpolicy.testing import ManualClock
from tests.faulty import FaultyStorage
from tests.serve_helpers import LINK_SECRET, Served

BASE = "http://127.0.0.1"
POLICY = {"limits": {"daily": {"value": "1000000000"}},
          "approvalConfig": {"thresholds": [{"amount": {"value": "100000000"},
                                             "requiredApprovers": 1, "approvers": ["alice"]}]}}  # fmt: skip
FORMS = ("/approvals/vote", "/signin", "/signout")
TEN_MB = 10 * 1024 * 1024


class Flaky(FaultyStorage):
    """A store whose ledger writes fail on demand (the token shard keeps working).

    ``fail = "down"``: a write fails before it commits. ``fail = "lost"``: it
    commits, then its answer is lost, as the stores say it (the outcome is
    unknown).
    """

    fail: str | None = None

    @contextmanager
    def session(self, shard: str, *, write: bool = True) -> Iterator[Session]:
        failing = self.fail if write and shard != "@tokens" else None
        if failing == "down":
            raise StorageUnavailableError(
                "the store is down (test); nothing was allowed or changed"
            )
        with self.inner.session(shard, write=write) as session:
            yield session
        if failing == "lost":
            raise StorageUnavailableError(
                "the connection was lost during a commit, so whether this change was recorded "
                "is unknown (test)"
            )


class Env:
    def __init__(self, storage: Flaky | None = None) -> None:
        self.storage = storage
        kwargs: dict[str, Any] = {} if storage is None else {"storage": storage}
        self.engine = PolicyEngine(clock=ManualClock(), link_secret=LINK_SECRET, **kwargs)
        self.engine.set_policy("bot", POLICY)
        self.app = create_app(self.engine, ServeOptions(sweep_seconds=3600.0))
        self.tokens = TokenStore(self.engine.storage, self.engine.clock)

    def browser(self) -> TestClient:
        return TestClient(self.app, base_url=BASE, follow_redirects=False,
                          raise_server_exceptions=False)  # fmt: skip

    def signed_in(self, role: str = "approver", **binding: Any) -> TestClient:
        b = self.browser()
        form = b.get("/signin")
        token = self.tokens.create(role, **binding)[1]
        answer = b.post("/signin", data={"token": token, "csrf": _value(form.text, "csrf"),
                                         "next": "/approvals"})  # fmt: skip
        assert answer.status_code == 303
        return b

    def pending(self, key: str | None = None) -> str:
        d = self.engine.authorize(PaymentRequest("bot", "200000000", "0xv", "eip155:8453",
                                                 idempotency_key=key))  # fmt: skip
        assert d.approval_id is not None
        return d.approval_id

    def link(self, approval_id: str, decision: str = "approve") -> str:
        return next(x.token for x in self.engine.approval_links(approval_id)
                    if x.decision == decision)  # fmt: skip

    def status(self, approval_id: str) -> str:
        return self.engine.get_approval(approval_id).status.value


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        e.engine.close()


def _value(page: str, name: str, after: str = "") -> str:
    match = re.search(rf'name="{name}" value="([^"]+)"', page[page.find(after) :])
    assert match is not None, f"no {name} in the page"
    return html.unescape(match.group(1))


def _outcome(page: str) -> str:
    match = re.search(r'<p class="outcome[^"]*"[^>]*>(.*?)</p>', page, re.S)
    assert match is not None
    return html.unescape(match.group(1))


# -- bodies: nothing large is read, nothing multipart is parsed --------------------------------


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every form parser made and every spooled temporary file opened (by name), in order."""
    made: list[str] = []
    for module, name in ((starlette.requests, "FormParser"),
                         (starlette.requests, "MultiPartParser"),
                         (starlette.formparsers, "SpooledTemporaryFile")):  # fmt: skip
        real = getattr(module, name)

        def record(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            made.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, record)
    return made


class _Counted:
    """The app, counting the body bytes it takes from the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.read = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@pytest.fixture
def server(env: Env) -> Iterator[tuple[Served, _Counted]]:
    s = Served(env.engine)
    counted = _Counted(s.app)
    s.server.config.app = counted  # uvicorn loads it when it starts
    with s:
        yield s, counted


def _exchange(port: int, head: bytes, chunks: Iterator[bytes]) -> tuple[int, bytes, float]:
    """Send ``head`` then ``chunks`` (in a thread) until answered; the status, answer, seconds."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    stop = threading.Event()

    def pump() -> None:
        try:
            sock.sendall(head)
            for chunk in chunks:
                if stop.is_set():
                    return
                sock.sendall(chunk)
        except OSError:  # answered and closed: the rest of the body is never read
            pass

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    answer = b""
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                break
            answer += part
            head_end = answer.find(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer[:head_end])
            if head_end >= 0 and length and len(answer) >= head_end + 4 + int(length[1]):
                break
    finally:
        elapsed = time.monotonic() - started
        stop.set()
        sock.close()
        sender.join(10)
    status = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert status is not None, answer[:200]
    return int(status[1]), answer, elapsed


def _head(path: str, content_type: str, length: int | None) -> bytes:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"{framing}\r\n\r\n").encode()  # fmt: skip


def _chunked(total: int, size: int = 16 * 1024) -> Iterator[bytes]:
    piece = b"f=" + b"x" * (size - 2)
    for _ in range(total // size):
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def _healthy(port: int) -> None:
    status, _, _ = _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", iter(()))
    assert status == 200


def test_a_declared_10_mb_form_body_is_refused_at_once_and_never_read(
    server: tuple[Served, _Counted], parsed: list[str]
) -> None:
    s, counted = server
    for path in FORMS:
        head = _head(path, "application/x-www-form-urlencoded", TEN_MB)
        # one megabyte is sent, of the ten declared: the answer must not wait for the rest
        status, answer, seconds = _exchange(s.port, head, iter([b"f=" + b"x" * 2**20]))
        assert status == 413, answer[:300]
        assert seconds < 5
        assert b"Too large" in answer
        assert b"content-type: text/html" in answer.lower()
    assert counted.read == 0  # not a byte of any body
    assert parsed == []
    _healthy(s.port)


def test_a_streamed_10_mb_form_body_is_cut_off_at_the_bound(
    server: tuple[Served, _Counted], parsed: list[str]
) -> None:
    s, counted = server
    for path in FORMS:
        counted.read = 0
        head = _head(path, "application/x-www-form-urlencoded", None)
        status, answer, seconds = _exchange(s.port, head, _chunked(TEN_MB))
        assert status == 413, answer[:300]
        assert seconds < 5
        # what was read: the bound, and at most what the server had buffered past it
        assert FORM_BODY_LIMIT < counted.read <= FORM_BODY_LIMIT + 256 * 1024
    assert parsed == []
    _healthy(s.port)


def test_a_multipart_file_part_is_refused_before_a_byte_is_read_or_spooled(
    server: tuple[Served, _Counted], parsed: list[str]
) -> None:
    s, counted = server
    part = (b'--xx\r\nContent-Disposition: form-data; name="token"; filename="a"\r\n\r\n'
            + b"y" * 2**20)  # fmt: skip
    for path in FORMS:
        for length in (500 * 2**20, None):  # a declared 500 MB part, and a streamed one
            head = _head(path, "multipart/form-data; boundary=xx", length)
            chunks = iter([part]) if length else _chunked(TEN_MB)
            status, answer, seconds = _exchange(s.port, head, chunks)
            assert status == 415, answer[:300]
            assert seconds < 5
            assert b"multipart/form-data" in answer
    assert counted.read == 0
    assert parsed == []  # no parser, no temporary file
    _healthy(s.port)


def test_small_multipart_forms_are_refused_too(env: Env, parsed: list[str]) -> None:
    approval = env.pending()
    b = env.browser()
    for path in FORMS:
        r = b.post(path, data={"approval": approval, "decision": "approve"},
                   files={"token": ("a.txt", b"y" * 1000)})  # fmt: skip
        assert r.status_code == 415
        assert r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"] == CSP
        assert "Traceback" not in r.text
    assert parsed == []
    assert env.status(approval) == "pending"
    b.post("/signout", data={"csrf": "x"})  # a form of ours is parsed (the record works)
    assert parsed == ["FormParser"]


def test_a_too_large_body_is_the_services_error_page_and_changes_nothing(env: Env) -> None:
    approval = env.pending()
    alice = env.signed_in(approver="alice")
    csrf = _value(alice.get(f"/approvals/{approval}").text, "csrf", after='name="approval"')
    r = alice.post("/approvals/vote", data={"approval": approval, "decision": "approve",
                                            "csrf": csrf, "comment": "x" * FORM_BODY_LIMIT})  # fmt: skip
    assert r.status_code == 413
    assert "<h1>Too large</h1>" in r.text
    assert r.headers["content-security-policy"] == CSP
    assert r.headers["connection"] == "close"
    assert env.status(approval) == "pending"
    # the same vote with a comment of a normal size counts
    r = alice.post("/approvals/vote", data={"approval": approval, "decision": "approve",
                                            "csrf": csrf, "comment": "fine"})  # fmt: skip
    assert r.status_code == 200
    assert env.status(approval) == "approved"


def test_the_largest_real_vote_fits_the_bound(env: Env) -> None:
    # the longest comment the engine takes, each character nine bytes urlencoded, by a link
    approval = env.pending()
    link = env.link(approval)
    b = env.browser()
    page = b.get("/approvals/link", params={"t": link})
    comment = "€" * 1024
    r = b.post("/approvals/vote", data={"approval": approval, "decision": "approve", "t": link,
                                        "csrf": _value(page.text, "csrf"), "comment": comment})  # fmt: skip
    assert r.status_code == 200, _outcome(r.text)
    assert env.engine.get_approval(approval).votes[0].comment == comment


def test_a_form_of_many_fields_is_a_400_page(env: Env) -> None:
    r = env.browser().post("/approvals/vote", data={f"k{i}": "v" for i in range(50)})
    assert r.status_code == 400
    assert "not a form of this service" in r.text
    assert r.headers["content-type"].startswith("text/html")


# -- votes while the store fails ---------------------------------------------------------------


@pytest.fixture
def flaky() -> Iterator[Env]:
    e = Env(Flaky())
    try:
        yield e
    finally:
        e.engine.close()


def _vote_form(env: Env, via: str, approval: str) -> tuple[TestClient, dict[str, str]]:
    if via == "link":
        b = env.browser()
        link = env.link(approval)
        page = b.get("/approvals/link", params={"t": link})
        return b, {"approval": approval, "decision": "approve", "t": link,
                   "csrf": _value(page.text, "csrf")}  # fmt: skip
    b = env.signed_in(approver="alice")
    csrf = _value(b.get(f"/approvals/{approval}").text, "csrf", after='name="approval"')
    return b, {"approval": approval, "decision": "approve", "csrf": csrf}


@pytest.mark.parametrize("via", ["session", "link"])
def test_a_vote_while_the_store_is_down_is_a_503(flaky: Env, via: str) -> None:
    approval = flaky.pending()
    b, form = _vote_form(flaky, via, approval)
    assert isinstance(flaky.storage, Flaky)
    flaky.storage.fail = "down"
    r = b.post("/approvals/vote", data=form)
    flaky.storage.fail = None
    assert r.status_code == 503
    assert "The store is unavailable: the store is down (test)" in _outcome(r.text)
    assert flaky.status(approval) == "pending"
    # once it is back, the same form votes
    assert b.post("/approvals/vote", data=form).status_code == 200
    assert flaky.status(approval) == "approved"


@pytest.mark.parametrize("via", ["session", "link"])
def test_a_vote_whose_answer_was_lost_says_the_outcome_is_unknown(flaky: Env, via: str) -> None:
    approval = flaky.pending()
    b, form = _vote_form(flaky, via, approval)
    assert isinstance(flaky.storage, Flaky)
    flaky.storage.fail = "lost"
    r = b.post("/approvals/vote", data=form)
    flaky.storage.fail = None
    assert r.status_code == 503
    said = _outcome(r.text)
    assert "Nothing was changed" not in r.text
    assert "Whether it was recorded is unknown" in said
    assert "reload" in said
    assert "may not have been counted" in r.text
    assert flaky.status(approval) == "approved"  # it was: the page could not know


# -- the access log ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t", "%74"])
def test_a_link_token_never_reaches_the_access_log_however_its_name_is_written(
    env: Env, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    approval = env.pending()
    link = env.link(approval)
    for path in ("/approvals/link", f"/approvals/{approval}"):
        query = f"a=1&{name}={link}&b=2"
        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
                 "query_string": query.encode(), "root_path": "", "headers": []}  # fmt: skip
        assert Request(scope).query_params.get("t") == link  # how the service reads it
        page = env.browser().get(f"{path}?{query}")
        assert page.status_code == 200  # the service takes it as the link
        assert 'value="approve"' in page.text
        logger = logging.getLogger("test.uvicorn.access")
        logger.addFilter(_RedactLinks())
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                        get_path_with_query_string(scope), "1.1", 200)  # fmt: skip
        line = caplog.records[-1].getMessage()
        assert link not in line
        assert f"{name}=***" in line
        assert "a=1&" in line
        assert "&b=2" in line


def test_a_link_token_under_another_name_is_redacted_too(env: Env) -> None:
    link = env.link(env.pending())
    assert link not in redact_links(f'"GET /signin?next=%2Fapprovals%2Fx%3Ft%3D{link} HTTP/1.1"')
    encoded = link.replace(".", "%2E")
    assert encoded not in redact_links(f"GET /approvals/link?x={encoded} HTTP/1.1")
    assert redact_links("GET /agents/bot?fragment=1 HTTP/1.1") == (
        "GET /agents/bot?fragment=1 HTTP/1.1"
    )


# -- a link whose approver registered a key since --------------------------------------------


def test_a_link_page_offers_no_vote_once_its_approver_registered_a_key(env: Env) -> None:
    approval = env.pending()
    link = env.link(approval)
    env.engine.register_approver("alice", SigningKey.generate().public_key)
    page = env.browser().get("/approvals/link", params={"t": link})
    assert page.status_code == 200
    assert 'value="approve"' not in page.text
    assert "must be signed with alice&#39;s key" in page.text
    assert f"agentpolicy approvals approve {approval} --as alice --key KEY_FILE" in page.text
    assert env.status(approval) == "pending"

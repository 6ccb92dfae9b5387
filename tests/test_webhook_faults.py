"""Webhook delivery against receivers that misbehave: broken HTTP, dripping, silent, slow.

One bad receiver must never stop the others, hold a worker past its
timeout, make ``flush`` overrun its own, or get an event twice from two
workers sharing one store; and a late outcome never overwrites a newer one.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from agentpolicy import PolicyEngine, PolicyValidationError
from agentpolicy.ledger import outbox
from agentpolicy.records import DeliveryStatus
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, payment
from agentpolicy.webhooks import WebhookEndpoint, endpoints_from_env
from tests.receiver import RawReceiver, Receiver

SECRET = "whsec-test-123"
POLICY = {
    "limits": {"daily": {"value": "10000000000"}},
    "approvalConfig": {"thresholds": [{"amount": {"value": "100000000"},
                                       "requiredApprovers": 1, "approvers": ["ops"]}]},
}  # fmt: skip

ANSWERS: dict[str, bytes] = {
    "not HTTP": b"HELLO I AM NOT HTTP\r\n\r\n",
    "a header line past 64 KiB": b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n",
    "more than 100 headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-%d: a\r\n" % i for i in range(150))
    + b"\r\n",
}


@pytest.fixture
def good() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def raw(answer: Callable[[socket.socket], None]) -> Iterator[RawReceiver]:
    r = RawReceiver(answer)
    yield r
    r.stop()


def engine_with(
    *endpoints: dict[str, Any], storage: Any = None, backoff: float = 0.01
) -> PolicyEngine:
    engine = PolicyEngine(
        storage=storage or MemoryStorage(),
        clock=ManualClock(),
        webhook_endpoints=[{"secret": SECRET, **e} for e in endpoints],
        webhook_backoff=backoff,
        webhook_backoff_cap=2 * backoff,
    )
    engine.set_policy("agent-123", POLICY)
    return engine


def ask(engine: PolicyEngine, n: int = 1) -> None:
    for _ in range(n):
        assert engine.authorize(payment(500_000_000, agent_id="agent-123")).requires_approval


def of(engine: PolicyEngine, url: str) -> list[Any]:
    wanted = WebhookEndpoint(url=url, secret=SECRET).id
    return [d for d in engine.webhook_deliveries() if d.endpoint_id == wanted]


@pytest.mark.parametrize("answer", list(ANSWERS))
def test_a_receiver_that_answers_no_http_fails_for_good_and_never_stops_the_others(
    answer: str, good: Receiver
) -> None:
    for bad in raw(lambda conn: conn.sendall(ANSWERS[answer])):
        engine = engine_with({"url": bad.url, "timeout": "2s", "maxAttempts": 3},
                             {"url": good.url, "timeout": "2s"})  # fmt: skip
        ask(engine, 2)
        assert engine.flush_webhooks(10)  # never raises
        failed = of(engine, bad.url)
        assert [(d.status, d.attempts) for d in failed] == [(DeliveryStatus.FAILED, 3)] * 2
        assert all((d.last_error or "").startswith("protocol error: ") for d in failed)
        assert len(good.received) == 2
        engine.close()


def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_timeout(
    good: Receiver, stop: threading.Event
) -> None:
    def drip(conn: socket.socket) -> None:  # a valid answer, one byte every 0.2 s
        for byte in b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 1000 + b"\r\n\r\n":
            if stop.wait(0.2):
                return
            conn.sendall(bytes([byte]))

    for slow in raw(drip):
        engine = engine_with({"url": slow.url, "timeout": "1s", "maxAttempts": 1},
                             {"url": good.url, "timeout": "1s"})  # fmt: skip
        ask(engine)
        started = time.monotonic()
        assert engine.flush_webhooks(10)
        # one attempt of 1 s, not the whole drip (over 200 s); room for a busy host
        assert time.monotonic() - started < 8.0
        (cut,) = of(engine, slow.url)
        assert (cut.status, cut.last_error) == (DeliveryStatus.FAILED, "no answer in time (1 s)")
        assert len(good.received) == 1
        engine.close()


def test_a_silent_endpoint_costs_the_others_one_timeout_and_flush_keeps_its_deadline(
    good: Receiver, stop: threading.Event
) -> None:
    for silent in raw(lambda conn: stop.wait(30) and None):
        engine = engine_with({"url": silent.url, "timeout": "1s", "maxAttempts": 5},
                             {"url": good.url, "timeout": "1s"})  # fmt: skip
        ask(engine, 6)  # six events for each endpoint
        started = time.monotonic()
        done = engine.flush_webhooks(timeout=2.0)
        took = time.monotonic() - started
        assert not done  # the silent endpoint's events still wait
        # its deadline (2 s), plus at most one attempt's timeout (1 s), plus room for a busy
        # host; it was 6 s and more
        assert took < 5.5
        assert len(good.received) == 6  # the healthy endpoint got all of its own meanwhile
        assert engine.webhooks is not None
        engine.webhooks.close()  # no other worker claims from here on
        left = engine.outbox.claim_webhooks(
            [WebhookEndpoint(url=silent.url, secret=SECRET).id], time.time() + 1, 5.0, 50
        )
        assert len(left) == 6  # none held by a lease: what was not attempted was given back
        stop.set()
        engine.close()


def test_two_workers_never_send_one_event_twice_to_a_slow_receiver(good: Receiver) -> None:
    """A batch leased at once and sent one by one lost its lease behind the slow answers."""
    good.delay = 0.25
    storage = MemoryStorage()
    first = engine_with({"url": good.url, "timeout": "1s"}, storage=storage)
    second = engine_with({"url": good.url, "timeout": "1s"}, storage=storage)
    for engine in (first, second):
        assert engine.webhooks is not None
        engine.webhooks.lease = 1.0  # longer than an attempt; a batch of 12 takes 3 s
    ask(first, 12)
    threads = [threading.Thread(target=e.flush_webhooks, args=(20,)) for e in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [r.headers["X-Webhook-Id"] for r in good.received]
    assert len(ids) == 12
    assert len(set(ids)) == 12
    for engine in (first, second):
        engine.close()


def test_a_late_outcome_never_overwrites_a_newer_one(good: Receiver) -> None:
    engine = engine_with({"url": good.url})
    assert engine.webhooks is not None
    engine.webhooks.close()  # this test is the only worker
    ask(engine)
    outbox, endpoint = engine.outbox, WebhookEndpoint(url=good.url, secret=SECRET).id
    (slow,) = outbox.claim_webhooks([endpoint], 1000.0, 5.0, 1)
    (fast,) = outbox.claim_webhooks([endpoint], 1006.0, 5.0, 1)  # the first lease ran out
    assert slow.id == fast.id
    outbox.finish_webhook(
        attrs.evolve(fast, status=DeliveryStatus.DELIVERED, attempts=1),
        leased_until=fast.next_attempt_at,
    )
    outbox.finish_webhook(  # the first worker's answer came late: an error
        attrs.evolve(slow, status=DeliveryStatus.FAILED, attempts=1, last_error="HTTP 400"),
        leased_until=slow.next_attempt_at,
    )
    outbox.finish_webhook(attrs.evolve(slow, attempts=1, next_attempt_at=0.0, last_error="x"))
    (kept,) = engine.webhook_deliveries()
    assert (kept.status, kept.attempts, kept.last_error) == (DeliveryStatus.DELIVERED, 1, None)
    assert outbox.pending_webhooks([endpoint]) == 0
    engine.close()


def test_a_lease_is_moved_only_by_the_claim_that_holds_it(good: Receiver) -> None:
    engine = engine_with({"url": good.url})
    assert engine.webhooks is not None
    engine.webhooks.close()  # this test is the only worker
    ask(engine)
    outbox, endpoint = engine.outbox, WebhookEndpoint(url=good.url, secret=SECRET).id
    (old,) = outbox.claim_webhooks([endpoint], 1000.0, 5.0, 1)
    assert outbox.lease_webhook(old, old.next_attempt_at, 1010.0)  # renewed while still held
    assert not outbox.claim_webhooks([endpoint], 1006.0, 5.0, 1)  # the renewed lease holds
    (new,) = outbox.claim_webhooks([endpoint], 1011.0, 5.0, 1)  # it ran out: taken over
    assert not outbox.lease_webhook(old, 1010.0, 2000.0)  # the old claim renews nothing
    assert not outbox.lease_webhook(old, 1010.0, 0.0)  # nor gives anything back
    assert outbox.lease_webhook(new, new.next_attempt_at, 0.0)  # given back: due at once
    (again,) = outbox.claim_webhooks([endpoint], 1.0, 5.0, 1)
    outbox.finish_webhook(
        attrs.evolve(again, status=DeliveryStatus.DELIVERED, attempts=1),
        leased_until=again.next_attempt_at,
    )
    assert not outbox.lease_webhook(again, again.next_attempt_at, 0.0)  # finished: left alone
    assert outbox.pending_webhooks([endpoint]) == 0
    engine.close()


def test_what_a_round_claimed_and_did_not_attempt_is_given_back_at_once(good: Receiver) -> None:
    """A batch is claimed at once: its unsent part must not wait for the lease to run out."""
    good.delay = 0.3
    engine = engine_with({"url": good.url, "timeout": "1s"})
    assert engine.webhooks is not None
    engine.webhooks.close()  # only flush sends
    ask(engine, 8)
    assert not engine.flush_webhooks(0.5)  # its deadline passes after an attempt or two
    sent = len(good.received)
    assert 1 <= sent < 8
    endpoint = WebhookEndpoint(url=good.url, secret=SECRET).id
    left = engine.outbox.claim_webhooks([endpoint], time.time(), 5.0, 50)
    assert len(left) == 8 - sent  # another worker can take them now
    assert all(d.attempts == 0 for d in left)
    engine.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:99999/hooks", "valid host and port"),
        ("http://127.0.0.1:abc/hooks", "valid host and port"),
        ("http://[::1/hooks", "valid host and port"),
        ("http://a..b/hooks", "valid host and port"),
        ("http://h:0/hooks", "valid host and port"),
        ("https://h/hooks?token=TOPSECRET\x7f", "control characters"),
        ("https://h/hooks/\u00e4", "ASCII only"),
    ],
)
def test_an_endpoint_url_that_cannot_be_sent_to_is_refused_without_showing_it(
    url: str, message: str
) -> None:
    with pytest.raises(PolicyValidationError) as refused:
        WebhookEndpoint(url=url, secret=SECRET)
    assert refused.value.path == "$.url"
    assert message in refused.value.message
    assert "TOPSECRET" not in str(refused.value)


def test_urls_that_can_be_sent_to_are_kept() -> None:
    for url in ("https://[::1]:8443/x", "https://b\u00fccher.example/x", "http://u:p@h:8080/x?t=1"):
        assert WebhookEndpoint(url=url, secret=SECRET).url == url


@pytest.mark.parametrize(
    ("env", "path"),
    [
        ({"AGENT_POLICY_WEBHOOK_RETRIES": "\u00b2"}, "$AGENT_POLICY_WEBHOOK_RETRIES"),
        ({"AGENT_POLICY_WEBHOOK_RETRIES": "\u0661\u0664"}, "$AGENT_POLICY_WEBHOOK_RETRIES"),
    ],
)
def test_retries_in_other_digits_are_refused_with_the_variable(
    env: dict[str, str], path: str
) -> None:
    base = {"AGENT_POLICY_WEBHOOK_URL": "https://h/x", "AGENT_POLICY_WEBHOOK_SECRET": SECRET}
    with pytest.raises(PolicyValidationError) as refused:
        endpoints_from_env({**base, **env})
    assert refused.value.path == path


@pytest.mark.parametrize("retries", ["x", "9" * 5000, "100", "-1", "1.5", ""])
def test_retries_that_are_not_0_to_99_say_so_with_the_variable(retries: str) -> None:
    """They said 'must be an integer, not string' (and '$.maxAttempts' for 100 to 999)."""
    base = {"AGENT_POLICY_WEBHOOK_URL": "https://h/x", "AGENT_POLICY_WEBHOOK_SECRET": SECRET}
    if not retries:  # an empty variable is not set: the default
        assert endpoints_from_env({**base, "AGENT_POLICY_WEBHOOK_RETRIES": retries})
        return
    with pytest.raises(PolicyValidationError) as refused:
        endpoints_from_env({**base, "AGENT_POLICY_WEBHOOK_RETRIES": retries})
    assert str(refused.value) == (
        "$AGENT_POLICY_WEBHOOK_RETRIES: must be a whole number of retries after the first try, "
        "0 to 99"
    )
    listed = {"AGENT_POLICY_WEBHOOKS": json.dumps([{"url": "https://h/x", "secret": SECRET,
                                                    "retries": retries}])}  # fmt: skip
    with pytest.raises(PolicyValidationError) as refused:
        endpoints_from_env(listed)
    assert refused.value.path == "$AGENT_POLICY_WEBHOOKS[0].retries"


def test_webhooks_nested_too_deeply_are_invalid_input() -> None:
    """100,000 nested lists raised RecursionError (INTERNAL in the CLI and the MCP server)."""
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(PolicyValidationError) as refused:
        endpoints_from_env({"AGENT_POLICY_WEBHOOKS": deep})
    assert refused.value.path == "$AGENT_POLICY_WEBHOOKS"
    assert "nested too deeply" in str(refused.value)


def test_events_that_are_not_names_are_refused_with_their_path() -> None:
    env = {"AGENT_POLICY_WEBHOOKS": '[{"url": "https://h/x", "secret": "s", "events": [["x"]]}]'}
    with pytest.raises(PolicyValidationError) as refused:
        endpoints_from_env(env)
    assert refused.value.path == "$AGENT_POLICY_WEBHOOKS[0].events"


@pytest.mark.parametrize("backlog", ["no process sends", "down"])
def test_a_backlog_of_one_endpoint_never_hides_another_endpoints_events(
    backlog: str, good: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard's queue was read 1,000 deliveries at a time, whatever their endpoint."""
    monkeypatch.setattr(outbox, "_QUEUE_SCAN", 10)  # the bound, made small
    storage = MemoryStorage()
    old = {"url": "http://127.0.0.1:9/hooks?token=OLD", "timeout": "1s"}  # nobody listens
    first = engine_with(old, storage=storage)
    assert first.webhooks is not None
    first.webhooks.close()  # stopped before it sent anything (or its URL was rotated since)
    ask(first, 12)
    listening = {"url": good.url}
    if backlog == "down":  # the old endpoint is still configured, and refusing connections
        second = engine_with(old, listening, storage=storage, backoff=60.0)  # backs off long
    else:
        second = engine_with(listening, storage=storage)
    ask(second)
    second.flush_webhooks(3)
    assert len(good.received) == 1  # the new approval reached the endpoint that listens
    if backlog == "no process sends":
        assert second.flush_webhooks(1)  # nothing pending for its own endpoint
    for engine in (first, second):
        engine.close()


@contextlib.contextmanager
def _addresses(
    monkeypatch: pytest.MonkeyPatch, host: str, port: int, ips: tuple[str, ...]
) -> Iterator[None]:
    """``host`` resolves to ``ips`` in turn; 127.0.0.2 among them never answers a connection."""
    hole = socket.socket()  # a full backlog on 127.0.0.2: a connection there is never answered
    hole.bind(("127.0.0.2", port))
    hole.listen(0)
    filler = socket.create_connection(("127.0.0.2", port), timeout=1)
    real = socket.getaddrinfo

    def resolved(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == host:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolved)
    try:
        yield
    finally:
        filler.close()
        hole.close()


def test_a_host_whose_first_address_does_not_answer_is_reached_at_the_next(
    good: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like broken IPv6 beside a working IPv4: the attempt's time starts once connected."""
    with _addresses(monkeypatch, "dual.example.test", good.port, ("127.0.0.2", "127.0.0.1")):
        engine = engine_with({"url": f"http://dual.example.test:{good.port}/hooks",
                              "timeout": "1s"})  # fmt: skip
        ask(engine)
        assert engine.flush_webhooks(10)
        assert len(good.received) == 1
        engine.close()


def test_an_attempt_gives_up_on_a_host_none_of_whose_addresses_answer_in_twice_its_timeout(
    good: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each address had the whole timeout: an attempt outlasted its lease and a second
    worker sent the same event at the same time. Reaching the host has twice the timeout."""
    dead_then_alive = ("127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.1")
    with _addresses(monkeypatch, "many.example.test", good.port, dead_then_alive):
        engine = engine_with({"url": f"http://many.example.test:{good.port}/hooks",
                              "timeout": "300ms"}, backoff=60.0)  # fmt: skip
        assert engine.webhooks is not None
        assert engine.webhooks.lease == 3 * 0.3 + 5.0
        ask(engine)
        engine.flush_webhooks(1)
        assert good.received == []  # given up before the fourth address: two timeouts spent
        (delivery,) = engine.webhook_deliveries("pending", 10)
        assert delivery.attempts == 1
        assert delivery.last_error == "no answer in time (0.3 s)"
        engine.close()


@pytest.mark.parametrize(
    ("env", "path"),
    [
        ({"AGENT_POLICY_WEBHOOK_SECRET": "s\udcff"}, "$AGENT_POLICY_WEBHOOK_SECRET"),
        ({"AGENT_POLICY_WEBHOOK_URL": "http://u\udcff:p@127.0.0.1:9/"},
         "$AGENT_POLICY_WEBHOOK_URL"),
        ({"AGENT_POLICY_WEBHOOK_URL": None, "AGENT_POLICY_WEBHOOK_SECRET": None,
          "AGENT_POLICY_WEBHOOKS": '[{"url": "http://127.0.0.1:9/", "secret": "a\\ud800"}]'},
         "$AGENT_POLICY_WEBHOOKS[0].secret"),
    ],
)  # fmt: skip
def test_a_secret_or_url_utf8_cannot_carry_is_refused_with_its_variable(
    env: dict[str, str | None], path: str
) -> None:
    # an undecodable byte in a variable (os.environ's lone surrogate) raised UnicodeEncodeError
    # (INTERNAL in the CLI, a traceback from the MCP server) instead of naming the variable
    base = {"AGENT_POLICY_WEBHOOK_URL": "https://h/x", "AGENT_POLICY_WEBHOOK_SECRET": SECRET}
    merged = {k: v for k, v in {**base, **env}.items() if v is not None}
    with pytest.raises(PolicyValidationError) as refused:
        endpoints_from_env(merged)
    assert refused.value.path == path
    assert "lone surrogate" in str(refused.value)


@pytest.mark.parametrize("value", ["1", -1.0, 0, float("nan"), float("inf"), True, 86_401])
@pytest.mark.parametrize("name", ["webhook_backoff", "webhook_backoff_cap"])
def test_webhook_backoffs_that_are_not_seconds_are_invalid_input(name: str, value: Any) -> None:
    # a string threw in the worker on every retry (the event never moved); a negative one made
    # every retry at once
    with pytest.raises(PolicyValidationError) as refused:
        PolicyEngine(**{name: value})
    path = {"webhook_backoff": "$.webhookBackoff", "webhook_backoff_cap": "$.webhookBackoffCap"}
    assert refused.value.path == path[name]
    PolicyEngine(**{name: 0.5}).close()

"""A webhook attempt's host-name lookup is bounded by the attempt's timeout.

``socket.getaddrinfo`` blocks for as long as the system resolver takes. A
resolver that hangs must not hold the delivery worker (or ``flush``) past
the attempt's timeout: the lookup runs on a small pool of threads (at most
4 lookups at once, however many attempts are made meanwhile), the attempt
fails as a timeout and is retried later, and once the resolver answers
again the event is delivered. The resolver here is a stand-in that blocks
on an event: nothing sleeps but the (small) timeouts the tests configure.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agentpolicy import PolicyEngine, delivery
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, payment
from tests.receiver import Receiver

SECRET = "whsec-test-123"
TIMEOUT = 0.5  # seconds: each attempt's timeout
SLACK = 5.0  # seconds: room for a loaded machine; a hung lookup would take for ever
POLICY = {
    "limits": {"daily": {"value": "10000000000"}},
    "approvalConfig": {"thresholds": [{"amount": {"value": "100000000"},
                                       "requiredApprovers": 1, "approvers": ["ops"]}]},
}  # fmt: skip


class HangingResolver:
    """``socket.getaddrinfo`` for ``*.hang.test``: blocks until ``answer`` is set, then 127.0.0.1.

    It counts the lookups it was asked for and the most that were in flight at once.
    """

    def __init__(self, real: Any) -> None:
        self.real = real
        self.answer = threading.Event()
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(host, str) and host.endswith(".hang.test")):
            return self.real(host, port, *args, **kwargs)
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.answer.wait(60)  # the test sets it; 60 s only so a broken test ends
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[HangingResolver]:
    hanging = HangingResolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    if hasattr(delivery, "_Resolver"):  # a pool of its own: no lookup left over from elsewhere
        monkeypatch.setattr(delivery, "_RESOLVER", delivery._Resolver())
    yield hanging
    hanging.answer.set()  # every lookup still waiting returns (and frees its thread)


@pytest.fixture
def good() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def engine_for(*hosts: str, port: int) -> PolicyEngine:
    """An engine sending to ``hosts`` whose background worker is stopped: flush drives it."""
    engine = PolicyEngine(
        storage=MemoryStorage(),
        clock=ManualClock(),
        webhook_endpoints=[
            {
                "url": f"http://{host}:{port}/hooks",
                "secret": SECRET,
                "timeout": f"{int(TIMEOUT * 1000)}ms",
                "maxAttempts": 10,
            }
            for host in hosts
        ],
        webhook_backoff=0.01,
        webhook_backoff_cap=0.02,
    )
    assert engine.webhooks is not None
    engine.webhooks.close()  # only the test's flushes attempt anything
    engine.set_policy("agent-123", POLICY)
    assert engine.authorize(payment(500_000_000, agent_id="agent-123")).requires_approval
    return engine


def within(seconds: float, work: Any) -> None:
    """Run ``work()`` in a thread; fail unless it returns within ``seconds``."""
    done = threading.Event()

    def run() -> None:
        work()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(seconds), f"still waiting for the lookup after {seconds} s"


def one_run(engine: PolicyEngine) -> Any:
    """One round of the worker: every due delivery attempted once."""
    assert engine.webhooks is not None
    return engine.webhooks.run_once


def test_an_attempt_whose_lookup_hangs_ends_within_its_timeout(
    resolver: HangingResolver, good: Receiver
) -> None:
    engine = engine_for("a.hang.test", port=good.port)
    try:
        within(TIMEOUT + SLACK, one_run(engine))  # one attempt: it ends at its timeout
        assert resolver.calls == 1
        (pending,) = engine.webhook_deliveries("pending")
        assert pending.attempts == 1
        assert pending.last_error == f"no answer in time ({TIMEOUT:g} s)"  # like any timeout
        assert good.received == []
    finally:
        resolver.answer.set()
        engine.close()


def test_at_most_four_lookups_are_in_flight_however_many_attempts(
    resolver: HangingResolver, good: Receiver
) -> None:
    hosts = [f"h{i}.hang.test" for i in range(6)]
    engine = engine_for(*hosts, port=good.port)  # one delivery per endpoint, six attempts a run
    try:
        for _ in range(2):  # two runs: twelve attempts, each bounded by its timeout
            within(6 * TIMEOUT + SLACK, one_run(engine))
        assert resolver.most_in_flight <= 4
        assert resolver.calls <= 4  # the hung lookups hold every thread: no fifth is started
        pending = engine.webhook_deliveries("pending")
        assert len(pending) == 6
        for d in pending:
            assert d.last_error == f"no answer in time ({TIMEOUT:g} s)"
    finally:
        resolver.answer.set()
        engine.close()


def test_the_event_is_delivered_once_the_resolver_answers_again(
    resolver: HangingResolver, good: Receiver
) -> None:
    engine = engine_for("back.hang.test", port=good.port)
    try:
        within(TIMEOUT + SLACK, one_run(engine))
        assert engine.webhook_deliveries("pending")[0].last_error is not None
        resolver.answer.set()  # the resolver answers again (the hung lookup too: dropped)
        assert engine.flush_webhooks(10)
        assert len(good.received) == 1
        (sent,) = engine.webhook_deliveries("delivered")
        assert sent.attempts >= 2
        assert sent.last_error is None
    finally:
        engine.close()


def test_a_lookup_that_fails_is_a_network_error_retried_later(
    monkeypatch: pytest.MonkeyPatch, good: Receiver
) -> None:
    real = socket.getaddrinfo
    failing = threading.Event()
    failing.set()

    def unknown(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "gone.example.test" and failing.is_set():
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "gone.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    engine = engine_for("gone.example.test", port=good.port)
    try:
        engine.flush_webhooks(0.01)
        (pending,) = engine.webhook_deliveries("pending")
        assert pending.last_error == "network error: gaierror"
        failing.clear()
        assert engine.flush_webhooks(10)
        assert len(good.received) == 1
    finally:
        engine.close()


def test_a_host_whose_resolver_hangs_holds_one_lookup_thread_not_the_others_deliveries(
    resolver: HangingResolver, good: Receiver
) -> None:
    """Four attempts at one hung name took all four threads: every other endpoint then failed."""
    engine = engine_for("evil.hang.test", "localhost", port=good.port)
    assert engine.webhooks is not None
    urls = {i: e.url for i, e in engine.webhooks.endpoints.items()}
    try:

        def hostile_attempts() -> int:
            return max(
                d.attempts for d in engine.webhook_deliveries() if "evil" in urls[d.endpoint_id]
            )

        while hostile_attempts() < 6:  # the worker keeps trying the hung name
            within(2 * TIMEOUT + SLACK, one_run(engine))
        assert engine.authorize(payment(500_000_000, agent_id="agent-123")).requires_approval
        before = len(good.received)
        within(2 * TIMEOUT + SLACK, one_run(engine))  # the new event's honest delivery
        assert len(good.received) == before + 1
        honest = [d for d in engine.webhook_deliveries() if "localhost" in urls[d.endpoint_id]]
        assert [d.status for d in honest] == ["delivered", "delivered"]
        assert resolver.in_flight == 1  # one thread holds the hung lookup; the rest wait on it
    finally:
        resolver.answer.set()
        engine.close()

"""Webhook delivery probed as a hostile or broken receiver, and as an operator under stress.

A receiver whose certificate fails, one that sends interim (1xx) answers,
one that answers every attempt slowly with an error, an engine closed
while a batch is being sent, and endpoint URLs with a bracketed host no
connection can be made to.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentpolicy import PolicyEngine, PolicyValidationError
from agentpolicy.records import DeliveryStatus
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, payment
from agentpolicy.webhooks import WebhookEndpoint
from tests.receiver import RawReceiver, Receiver
from tests.test_webhook_faults import POLICY, SECRET

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
def good() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def engine_with(*endpoints: dict[str, Any], storage: Any = None) -> PolicyEngine:
    engine = PolicyEngine(
        storage=storage or MemoryStorage(),
        clock=ManualClock(),
        webhook_endpoints=[{"secret": SECRET, **e} for e in endpoints],
        webhook_backoff=0.01,
        webhook_backoff_cap=0.02,
    )
    engine.set_policy("agent-123", POLICY)
    return engine


def ask(engine: PolicyEngine, n: int = 1) -> None:
    for _ in range(n):
        assert engine.authorize(payment(500_000_000, agent_id="agent-123")).requires_approval


def endpoint_id(url: str) -> str:
    return WebhookEndpoint(url=url, secret=SECRET).id


# --- TLS -----------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a certificate no client trusts."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


def test_a_certificate_that_fails_verification_is_retried_not_called_an_invalid_url(
    tmp_path: Path,
) -> None:
    """ssl.SSLCertVerificationError is a ValueError too: it was failed at once, 'invalid URL'.

    A certificate that lapsed for an hour lost every event of that hour.
    """
    context = self_signed(tmp_path)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    handshakes = 0

    def serve() -> None:
        nonlocal handshakes
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            handshakes += 1
            with contextlib.suppress(OSError), conn:
                conn.settimeout(10)
                with context.wrap_socket(conn, server_side=True) as tls:  # the client refuses
                    tls.sendall(OK)

    threading.Thread(target=serve, daemon=True).start()
    engine = engine_with({"url": f"https://127.0.0.1:{port}/hooks", "timeout": "2s",
                          "maxAttempts": 3})  # fmt: skip
    ask(engine)
    assert engine.flush_webhooks(20)
    (refused,) = engine.webhook_deliveries()
    assert (refused.status, refused.attempts) == (DeliveryStatus.FAILED, 3)  # it was 1
    assert (refused.last_error or "").startswith("network error: SSLCertVerificationError")
    assert "invalid URL" not in (refused.last_error or "")
    assert handshakes == 3
    engine.close()
    server.close()


# --- interim answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        (b"HTTP/1.1 102 Processing\r\n\r\n" + OK, DeliveryStatus.DELIVERED, None),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
         b"HTTP/1.1 102 Processing\r\n\r\n" + OK, DeliveryStatus.DELIVERED, None),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
         b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", DeliveryStatus.FAILED, "HTTP 503"),
    ],
)  # fmt: skip
def test_interim_answers_are_read_past_to_the_final_one(
    answer: bytes, status: DeliveryStatus, error: str | None
) -> None:
    """A 102 or 103 before the 200 was taken for the answer: 'HTTP 102', failed at once."""
    bad = RawReceiver(lambda conn: conn.sendall(answer))
    engine = engine_with({"url": bad.url, "timeout": "2s", "maxAttempts": 2})
    ask(engine)
    assert engine.flush_webhooks(20)
    (sent,) = engine.webhook_deliveries()
    assert (sent.status, sent.last_error) == (status, error)
    assert sent.attempts == (1 if status is DeliveryStatus.DELIVERED else 2)
    engine.close()
    bad.stop()


# --- a slow receiver among others ----------------------------------------------------------


def test_a_receiver_that_answers_errors_slowly_costs_the_others_about_one_timeout_a_round(
    good: Receiver,
) -> None:
    """Only a receiver that gave no answer in time was left alone for the round.

    One answering 503 just inside its timeout held every other endpoint's
    events behind each of its own: 20 events at 0.8 s took the healthy
    endpoint 16 s, and with the default 5 s timeout a batch of 50 took 250 s.
    """
    slow = Receiver(default=503).start()
    slow.delay = 0.4  # each attempt takes at least this: within its timeout of 1 s
    # the healthy one's own attempts never add up to its timeout, however busy the machine
    engine = engine_with({"url": slow.url, "timeout": "1s"}, {"url": good.url, "timeout": "30s"})
    assert engine.webhooks is not None
    engine.webhooks.close()  # this test runs the rounds
    ask(engine, 10)  # ten events each, queued slow, good, slow, good, ...
    engine.webhooks.run_once()  # one round
    assert len(good.received) == 10
    # it is left alone once its attempts took its timeout (3 x 0.4 s >= 1 s); it was 10
    assert len(slow.requests) <= 3
    left = engine.outbox.claim_webhooks([endpoint_id(slow.url)], time.time() + 1, 5.0, 50)
    assert len(left) == 10  # given back at once: retried, or not yet attempted
    engine.close()
    slow.stop()


# --- closing with a batch under way ---------------------------------------------------------


def test_closing_stops_the_worker_after_the_attempt_under_way(good: Receiver) -> None:
    """The worker went on through its batch after close(): 6 POSTs after close had returned,
    and close() waited out its 5 s join, with the store closed under the thread."""
    arrived, release = threading.Event(), threading.Event()

    def answer(conn: socket.socket) -> None:
        arrived.set()
        release.wait(30)
        conn.sendall(OK)

    held = RawReceiver(answer)
    storage = MemoryStorage()
    first = engine_with({"url": held.url, "timeout": "30s"}, storage=storage)
    assert first.webhooks is not None
    first.webhooks.close()  # queues only
    ask(first, 5)
    second = engine_with({"url": held.url, "timeout": "30s"}, storage=storage)
    assert second.webhooks is not None
    assert arrived.wait(30)  # its worker claimed the five and is sending the first
    worker = second.webhooks._thread
    assert worker is not None
    second.webhooks.close(timeout=0)  # asked to stop while the attempt is under way
    release.set()
    worker.join(30)
    assert not worker.is_alive()
    assert held.connections == 1  # it was 5: the whole batch, after close
    left = second.outbox.claim_webhooks([endpoint_id(held.url)], time.time(), 5.0, 50)
    assert len(left) == 4  # given back: the next worker sends them at once
    assert all(d.attempts == 0 for d in left)
    for engine in (first, second):
        engine.close()
    held.stop()


# --- endpoint URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://[::1]x/hooks", "http://[v1.x]/hooks",
                                 "http://u:p@[::1]8080/hooks?token=TOPSECRET"])  # fmt: skip
def test_a_bracketed_host_that_is_no_ipv6_address_is_refused(url: str) -> None:
    """urlsplit read [::1]x as ::1 and accepted IPvFuture: both were kept and never reached."""
    with pytest.raises(PolicyValidationError) as refused:
        WebhookEndpoint(url=url, secret=SECRET)
    assert refused.value.path == "$.url"
    assert "valid host and port" in refused.value.message
    assert "TOPSECRET" not in str(refused.value)


@pytest.mark.parametrize("url", ["http://[::1]/hooks", "https://u:p@[::1]:8443/hooks",
                                 "http://[fe80::1%25eth0]:8080/hooks"])  # fmt: skip
def test_bracketed_ipv6_hosts_are_kept(url: str) -> None:
    assert WebhookEndpoint(url=url, secret=SECRET).url == url

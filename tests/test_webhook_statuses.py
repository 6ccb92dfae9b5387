"""Webhook answers at the edges of HTTP's statuses.

A status outside 100 to 599 and a ``101`` nobody asked for are protocol
errors, retried like an answer that is not HTTP at all; a 3xx (``304``
too) is failed at once; any 2xx delivers, whatever its body.
"""

from __future__ import annotations

import socket
import threading

import pytest

from agentpolicy.records import DeliveryStatus, WebhookDelivery
from tests.receiver import RawReceiver
from tests.test_webhook_faults import ask, engine_with

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
UPGRADE = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def status(code: int) -> bytes:
    return b"HTTP/1.1 %d Odd\r\nContent-Length: 0\r\n\r\n" % code


def scripted(*answers: bytes) -> RawReceiver:
    """A raw receiver answering its n-th request with ``answers[n]``, then the last one."""
    left = list(answers)
    lock = threading.Lock()

    def answer(conn: socket.socket) -> None:
        with lock:
            reply = left.pop(0) if len(left) > 1 else left[0]
        conn.sendall(reply)

    return RawReceiver(answer)


def one_event(receiver: RawReceiver, max_attempts: int = 3) -> WebhookDelivery:
    """Send one event to ``receiver`` until it is delivered or failed; its delivery."""
    # a long timeout: every answer here comes at once, and a busy host must not make it late
    engine = engine_with({"url": receiver.url, "timeout": "10s", "maxAttempts": max_attempts})
    ask(engine)
    assert engine.flush_webhooks(60)
    (delivery,) = engine.webhook_deliveries()
    engine.close()
    receiver.stop()
    return delivery


# --- statuses HTTP does not allow ------------------------------------------------------------


@pytest.mark.parametrize("code", [600, 799, 999])
def test_a_status_outside_100_to_599_is_a_protocol_error_retried_like_any_other(
    code: int,
) -> None:
    """It was taken for a 5xx: retried, but recorded as 'HTTP 600', as if a server said so."""
    receiver = scripted(status(code))
    failed = one_event(receiver)
    assert (failed.status, failed.attempts) == (DeliveryStatus.FAILED, 3)
    assert failed.last_error == f"protocol error: HTTP {code} (not an HTTP status)"
    assert receiver.connections == 3


def test_a_status_past_999_was_a_protocol_error_already() -> None:
    """The same failure, whichever side of 999 (http.client's own bound) the status falls."""
    receiver = scripted(status(1000))
    failed = one_event(receiver)
    assert (failed.status, failed.attempts) == (DeliveryStatus.FAILED, 3)
    assert failed.last_error == "protocol error: BadStatusLine"


def test_an_event_answered_600_is_delivered_once_the_receiver_answers_200() -> None:
    receiver = scripted(status(600), OK)
    delivered = one_event(receiver)
    assert (delivered.status, delivered.attempts, delivered.last_error) == (
        DeliveryStatus.DELIVERED, 2, None,
    )  # fmt: skip


def test_a_101_nobody_asked_for_is_a_protocol_error_and_the_event_is_sent_again() -> None:
    """A POST that sends no Upgrade is never switched: the 101 failed the event at once."""
    receiver = scripted(UPGRADE, OK)
    delivered = one_event(receiver)
    assert (delivered.status, delivered.attempts) == (DeliveryStatus.DELIVERED, 2)  # it was 1
    assert receiver.connections == 2


def test_a_receiver_that_always_switches_protocols_fails_after_max_attempts() -> None:
    receiver = scripted(UPGRADE + b"\x81\x05hello")  # and then speaks WebSocket
    failed = one_event(receiver)
    assert (failed.status, failed.attempts) == (DeliveryStatus.FAILED, 3)
    assert failed.last_error == "protocol error: HTTP 101 (no upgrade was asked for)"
    assert receiver.connections == 3


# --- other edges, as they are ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "outcome", "attempts", "error"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", DeliveryStatus.DELIVERED, 1, None),
        (b"HTTP/1.1 202 Accepted\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000,
         DeliveryStatus.DELIVERED, 1, None),
        (b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\n{}", DeliveryStatus.DELIVERED, 1, None),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n",
         DeliveryStatus.FAILED, 1, "HTTP 304 (redirect not followed)"),
        (status(300), DeliveryStatus.FAILED, 1, "HTTP 300 (redirect not followed)"),
        (status(499), DeliveryStatus.FAILED, 1, "HTTP 499"),
        (b"HTTP/1.1 199 Odd\r\n\r\n" + OK, DeliveryStatus.DELIVERED, 1, None),  # interim
    ],
)  # fmt: skip
def test_other_edge_statuses(
    answer: bytes, outcome: DeliveryStatus, attempts: int, error: str | None
) -> None:
    """Any 2xx delivers, whatever its body; every 3xx (a 304 too) is failed at once."""
    sent = one_event(scripted(answer))
    assert (sent.status, sent.attempts, sent.last_error) == (outcome, attempts, error)

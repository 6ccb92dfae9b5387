"""HTTP/1.1 for ``agentpolicy serve``: a whole request within a deadline, or the connection goes.

uvicorn closes a connection that stays idle after a response
(``timeout_keep_alive``), but none that sends a request's head or body
slowly, or only part of it: a client holding many such connections (the
governed agent, on the same host) kept every other caller out once the
process ran out of file descriptors. :class:`DeadlineProtocol` is uvicorn's
h11 protocol with one more timer: from the moment a connection opens, and
again after each response, the next request must arrive whole (head and
body) within :data:`REQUEST_SECONDS`, however its bytes trickle in; else the
connection is closed. A request that has arrived whole is the application's
from then on, whatever it takes to answer.

The answer must also leave. A client that sends requests (many at once,
pipelined, as small pages anyone may fetch) and never reads the answers
held its connection, and the task writing to it, for ever: uvicorn waits
without limit for a full send buffer to drain, and a connection closed
with answers still unsent keeps its file descriptor until they are. So
while answers wait to be sent, every :data:`WRITE_SECONDS` they must have
moved; if nothing left in that time, the connection is dropped (aborted,
its unsent answers discarded).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ  # SIOCOUTQ on a socket: unsent bytes in the kernel
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _OUTQ = None

__all__ = ["REQUEST_SECONDS", "WRITE_SECONDS", "DeadlineProtocol"]

REQUEST_SECONDS = 30.0
"""How long a client has to send a whole request (head and body) on a connection."""

WRITE_SECONDS = 30.0
"""How long answers waiting to be sent may stay without any of them leaving."""


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request is not whole in time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes waiting to be sent at the last look

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Open the connection, and start the clocks on its first request and on its answers."""
        super().connection_made(transport)
        self._arm()
        self._watch = self.loop.call_later(WRITE_SECONDS, self._look_at_writes)

    def data_received(self, data: bytes) -> None:
        """Read, and stop the clock once the request has arrived whole."""
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # DONE: the application's now (or the connection is closing)

    def on_response_complete(self) -> None:
        """A response went out: the next request has its own deadline."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: no clock left running for it."""
        self._disarm()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().connection_lost(exc)

    def _look_at_writes(self) -> None:
        """Drop the connection if the answers waiting to be sent have not moved since last time."""
        self._watch = None
        transport = self.transport
        if transport.get_protocol() is not self:  # taken over (an upgrade): not this one's to watch
            return
        unsent = transport.get_write_buffer_size() + _queued(transport)
        if unsent and unsent == self._unsent:
            transport.abort()  # close() would wait for them to leave: they never do
            return
        if not unsent and transport.is_closing():
            return  # closed with nothing left to send: connection_lost follows
        self._unsent = unsent
        self._watch = self.loop.call_later(WRITE_SECONDS, self._look_at_writes)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(REQUEST_SECONDS, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE or self.conn.their_state is h11.SEND_BODY:
            self.transport.close()  # nothing answered: a request never came whole


def _queued(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel holds for the peer, not yet acknowledged (Linux; else 0).

    A client reading slowly drains the kernel's queue long before asyncio's
    buffer moves (it moves once that queue is about half empty, and on
    loopback the queue grows to megabytes): counting both, a reader that
    reads is seen to move.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or _OUTQ is None:
        return 0
    try:
        held = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(held, sys.byteorder, signed=True)
